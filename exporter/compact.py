"""Store an ONNX model's weights as float16 (half the file size) while it still computes in float32.

Every large float32 initializer becomes a float16 initializer followed by a ``Cast`` back to
float32; onnxruntime folds those casts once when the session is created, so inference runs
exactly the float32 graph with weights rounded to float16 (relative error <= 2**-11). Used for
the demo bundle that ships inside the repository.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def fp16_storage(src: Path, dst: Path, min_elements: int = 64) -> Path:
    """Write ``src`` to ``dst`` with float16-stored weights; ultralytics metadata is kept."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    new_inits, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            arr = numpy_helper.to_array(init).astype(np.float16)
            half_name = init.name + "__fp16"
            new_inits.append(numpy_helper.from_array(arr, half_name))
            casts.append(helper.make_node("Cast", [half_name], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "__cast"))
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
