# The two commands a new user needs:  make demo  (train + evaluate + export the demo)  and  make test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA := demo_out/data
WORKDIR := demo_out/clip_tiny

.PHONY: install demo demo-data demo-cappa demo-coca demo-vlm test test-fast clean-demo peer-env

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,hf,wandb]'
	touch $@

$(DATA)/classnames.json: | install
	$(BIN)/python -m data_pipelines.make_shards synthetic --out $(DATA)

$(DATA)/spm.model: $(DATA)/classnames.json
	$(BIN)/python -m data_pipelines.tokenizer train --shards '$(DATA)/train/*.tar' --vocab-size 1000 --out $@

demo: install $(DATA)/spm.model
	$(BIN)/python -m vlm_jax.train --config=configs/demo/clip_tiny.py:$(DATA) --workdir=$(WORKDIR)
	$(BIN)/python -m vlm_jax.evaluate --workdir=$(WORKDIR)
	$(BIN)/python -m vlm_jax.export --workdir=$(WORKDIR) --out=$(WORKDIR)/hf
	@echo "Demo finished: metrics.jsonl, tensorboard/, checkpoints/, eval_results.json and the transformers folder hf/ are in $(WORKDIR)"

demo-data: install $(DATA)/spm.model

# The generative demos (README, "Generative pretraining"): train with their evaluators, then caption the
# held-out images with beam search.
demo-cappa demo-coca: demo-%: install $(DATA)/spm.model
	$(BIN)/python -m vlm_jax.train --config=configs/demo/$*_tiny.py:$(DATA) --workdir=demo_out/$*_tiny
	$(BIN)/python -m vlm_jax.generate --workdir=demo_out/$*_tiny --images=$(DATA)/eval --beam=4
	@echo "Finished: gallery.html, captions.jsonl, generated.jsonl and eval_results.json are in demo_out/$*_tiny"

# The decoder-only VLM demo (README, "Decoder-only VLM"): stage 0 is the contrastive demo (its image tower is
# copied and frozen), then packed prefix-LM training, then answers to a question.
$(WORKDIR)/eval_results.json: | $(DATA)/spm.model
	$(BIN)/python -m vlm_jax.train --config=configs/demo/clip_tiny.py:$(DATA) --workdir=$(WORKDIR)

demo-vlm: install $(DATA)/spm.model $(WORKDIR)/eval_results.json
	$(BIN)/python -m vlm_jax.train --config=configs/demo/vlm_tiny.py:$(DATA) --workdir=demo_out/vlm_tiny
	$(BIN)/python -m vlm_jax.generate --workdir=demo_out/vlm_tiny --images=$(DATA)/eval --prompt="what shape?"
	@echo "Finished: gallery.html, captions.jsonl, generated.jsonl and eval_results.json are in demo_out/vlm_tiny"

# The tests also need the TPU compiler (libtpu, about 700 MB): every kernel and train step is compiled for TPU.
$(VENV)/.installed-tpu: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,tpu]'
	touch $@

test: $(VENV)/.installed-tpu
	$(BIN)/python -m pytest -n 2 tests

test-fast: $(VENV)/.installed-tpu  # the inner loop: everything but the slow tests (end-to-end runs, > 8 s)
	$(BIN)/python -m pytest -n 2 -m "not slow" tests

clean-demo:
	rm -rf demo_out

# Peers for `python -m vlm_jax.bench step --peer=open_clip` live in their own environment (torch).
peer-env:
	$(PYTHON) -m venv .venv-peer
	.venv-peer/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 open_clip_torch 'webdataset<=0.2.86' pandas
