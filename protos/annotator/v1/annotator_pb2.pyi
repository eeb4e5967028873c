import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Visibility(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VISIBILITY_UNSPECIFIED: _ClassVar[Visibility]
    VISIBILITY_VISIBLE: _ClassVar[Visibility]
    VISIBILITY_OCCLUDED: _ClassVar[Visibility]
    VISIBILITY_OUTSIDE: _ClassVar[Visibility]
VISIBILITY_UNSPECIFIED: Visibility
VISIBILITY_VISIBLE: Visibility
VISIBILITY_OCCLUDED: Visibility
VISIBILITY_OUTSIDE: Visibility

class ClientMetadata(_message.Message):
    __slots__ = ("camera_id", "capture_time", "session", "request_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    capture_time: _timestamp_pb2.Timestamp
    session: str
    request_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, camera_id: _Optional[str] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session: _Optional[str] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AnnotateRequest(_message.Message):
    __slots__ = ("image", "metadata")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    metadata: ClientMetadata
    def __init__(self, image: _Optional[bytes] = ..., metadata: _Optional[_Union[ClientMetadata, _Mapping]] = ...) -> None: ...

class AnnotateStreamResponse(_message.Message):
    __slots__ = ("request_id", "annotation", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    annotation: Annotation
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., annotation: _Optional[_Union[Annotation, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("box", "conf")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CONF_FIELD_NUMBER: _ClassVar[int]
    box: Box
    conf: float
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., conf: _Optional[float] = ...) -> None: ...

class Keypoint(_message.Message):
    __slots__ = ("name", "x", "y", "main_conf", "visible_conf", "visibility")
    NAME_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    MAIN_CONF_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_CONF_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    x: float
    y: float
    main_conf: float
    visible_conf: float
    visibility: Visibility
    def __init__(self, name: _Optional[str] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., main_conf: _Optional[float] = ..., visible_conf: _Optional[float] = ..., visibility: _Optional[_Union[Visibility, str]] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("box", "conf", "keypoints")
    BOX_FIELD_NUMBER: _ClassVar[int]
    CONF_FIELD_NUMBER: _ClassVar[int]
    KEYPOINTS_FIELD_NUMBER: _ClassVar[int]
    box: Box
    conf: float
    keypoints: _containers.RepeatedCompositeFieldContainer[Keypoint]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., conf: _Optional[float] = ..., keypoints: _Optional[_Iterable[_Union[Keypoint, _Mapping]]] = ...) -> None: ...

class Judgement(_message.Message):
    __slots__ = ("score", "reasons", "decision", "audit")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    score: float
    reasons: _containers.RepeatedScalarFieldContainer[str]
    decision: str
    audit: bool
    def __init__(self, score: _Optional[float] = ..., reasons: _Optional[_Iterable[str]] = ..., decision: _Optional[str] = ..., audit: _Optional[bool] = ...) -> None: ...

class Annotation(_message.Message):
    __slots__ = ("image_id", "state", "source", "width", "height", "heads", "persons", "judgement", "bundle_id", "received_at", "updated_at", "camera_id", "error")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    PERSONS_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    state: str
    source: str
    width: int
    height: int
    heads: _containers.RepeatedCompositeFieldContainer[Head]
    persons: _containers.RepeatedCompositeFieldContainer[Person]
    judgement: Judgement
    bundle_id: str
    received_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    camera_id: str
    error: str
    def __init__(self, image_id: _Optional[str] = ..., state: _Optional[str] = ..., source: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., heads: _Optional[_Iterable[_Union[Head, _Mapping]]] = ..., persons: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., judgement: _Optional[_Union[Judgement, _Mapping]] = ..., bundle_id: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., camera_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class GetAnnotationRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class ListAnnotationsRequest(_message.Message):
    __slots__ = ("state", "decision", "since", "until", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: str
    decision: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[str] = ..., decision: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAnnotationsResponse(_message.Message):
    __slots__ = ("annotations", "next_page_token")
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    annotations: _containers.RepeatedCompositeFieldContainer[Annotation]
    next_page_token: str
    def __init__(self, annotations: _Optional[_Iterable[_Union[Annotation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelsRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("det_conf", "person_conf", "nms_iou", "main", "visible", "score_threshold", "audit_fraction")
    DET_CONF_FIELD_NUMBER: _ClassVar[int]
    PERSON_CONF_FIELD_NUMBER: _ClassVar[int]
    NMS_IOU_FIELD_NUMBER: _ClassVar[int]
    MAIN_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    det_conf: float
    person_conf: float
    nms_iou: float
    main: _containers.RepeatedScalarFieldContainer[float]
    visible: _containers.RepeatedScalarFieldContainer[float]
    score_threshold: float
    audit_fraction: float
    def __init__(self, det_conf: _Optional[float] = ..., person_conf: _Optional[float] = ..., nms_iou: _Optional[float] = ..., main: _Optional[_Iterable[float]] = ..., visible: _Optional[_Iterable[float]] = ..., score_threshold: _Optional[float] = ..., audit_fraction: _Optional[float] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("bundle_id", "bundle_path", "thresholds", "queue_depths", "counters", "uptime_seconds", "paused_reason", "version", "providers", "run_batch", "notices")
    class QueueDepthsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    RUN_BATCH_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    bundle_path: str
    thresholds: Thresholds
    queue_depths: _containers.ScalarMap[str, int]
    counters: _containers.ScalarMap[str, int]
    uptime_seconds: float
    paused_reason: str
    version: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    run_batch: int
    notices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, bundle_id: _Optional[str] = ..., bundle_path: _Optional[str] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., queue_depths: _Optional[_Mapping[str, int]] = ..., counters: _Optional[_Mapping[str, int]] = ..., uptime_seconds: _Optional[float] = ..., paused_reason: _Optional[str] = ..., version: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., run_batch: _Optional[int] = ..., notices: _Optional[_Iterable[str]] = ...) -> None: ...
