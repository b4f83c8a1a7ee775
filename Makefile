# Two commands for a fresh clone: `make demo` and `make test`. Both set up .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch first: PyPI's default Linux wheel of torch is a multi-GB CUDA build,
# and an unpinned resolve would fetch it. PyTorch's CPU index offers 2.13.0+cpu, which pip
# prefers to PyPI's 2.13.0; where that index cannot be reached, pip's own sources serve (a local
# CPU wheel on this project's machines). torch alone comes from it (--no-deps); what torch needs
# comes from PyPI with the project. The +cpu label never matches a CUDA wheel, whatever index
# answers. A GPU: TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128.
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint setup fashion-mnist campaign restore land progress photos transfer

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-deps --retries 1 --timeout 15 \
	  --extra-index-url "$(TORCH_INDEX)" "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The embedded default data set, Debian's dataset-fashion-mnist, installed when missing and possible
# (or its IDX files in DEEPRES_FASHION_MNIST_DIR); where neither, `make demo` stops here, at once.
fashion-mnist:
	@if [ -n "$$DEEPRES_FASHION_MNIST_DIR" ]; then \
	  test -d "$$DEEPRES_FASHION_MNIST_DIR" || \
	    { echo "make: DEEPRES_FASHION_MNIST_DIR=$$DEEPRES_FASHION_MNIST_DIR is not a folder"; exit 1; }; \
	else test -d /usr/share/datasets/fashion-mnist || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -qq dataset-fashion-mnist || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); } || \
	  { echo "make: no Fashion-MNIST: install Debian's dataset-fashion-mnist (as root: apt-get update &&" \
	    "apt-get install dataset-fashion-mnist) or point DEEPRES_FASHION_MNIST_DIR at a folder of its IDX files"; \
	    exit 1; }; fi

# The main job: ResNet-20 on Fashion-MNIST with the paper's recipe scaled to 2,000 iterations
# (about 5 minutes on 2 CPU cores), then its error on the official test split.
DEMO_RUN := runs/demo-fashion-mnist-resnet20
demo: fashion-mnist setup
	@if [ -f $(DEMO_RUN)/summary.json ]; then echo "$(DEMO_RUN) is already trained"; \
	elif [ -f $(DEMO_RUN)/checkpoint.safetensors ]; then \
	  $(VENV)/bin/deepres train --resume $(DEMO_RUN); \
	else rm -rf $(DEMO_RUN); $(VENV)/bin/deepres train --model resnet20 --data fashion-mnist \
	  --iters 2000 --eval-every 250 --checkpoint-every 250 --out $(DEMO_RUN); fi
	$(VENV)/bin/deepres eval $(DEMO_RUN) --data fashion-mnist --split test
	@echo "run: $(DEMO_RUN)/   training curves: $(DEMO_RUN)/curves.png"

test: setup
	$(VENV)/bin/ruff check deepres tests benchmarks
	$(VENV)/bin/ruff format --check deepres tests benchmarks
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check --fix deepres tests benchmarks
	$(VENV)/bin/ruff format deepres tests benchmarks

# Issue 9's campaign: the paper's CIFAR-10 protocol at the full 64k budget on all 50k training
# images, each net resumed where it stopped. Hours per net on a CPU: run it in the background;
# SIGTERM to the training processes checkpoints them and ends the campaign.
# Lanes: on the 2-core CPUs one step scales to 1.41-1.47x over 2 threads, so two nets side by
# side with a thread each train 1.36-1.42x the images/s of one net with both (benchmarks/lanes.py;
# LANES=1 finishes the next net sooner). Each lane takes the next net that is neither finished
# nor held by the other lane (flock). With fewer nets left than lanes when it starts, as many
# lanes as nets share the cores: a last net left alone trains on both, not on one thread beside
# an idle core (a lane that runs out of nets mid-campaign leaves its core idle until the next
# start: a run's threads are set when it starts).
CIFAR10 ?= ../shared/data/cifar10-jpeg-train.zip
# ResNet-20 was trained first, in fp32 on an AVX2-only CPU, and ships; on a CPU with bf16 units it
# trains again, in bf16 as the others do, right after ResNet-56: issue 9's two precisions side
# by side.
CAMPAIGN_NETS ?= resnet56 resnet20 plain56 plain20 resnet32 resnet44 resnet110 plain110
CAMPAIGN_RUNS ?= runs/reproduce-cifar10-jpeg-train-zip-full
CAMPAIGN_REPORTS ?= runs/campaign-reports
CAMPAIGN_LOGS ?= runs/campaign-logs
CAMPAIGN_BUDGET ?= full
LANES ?= 2
# Threads per lane; by default the cores divided among the lanes that run.
LANE_THREADS ?=
# OMP_WAIT_POLICY=PASSIVE: with spinning OpenMP threads a two-thread step slowed 4x whenever a
# test or build shared the cores; passive waits cost it 14% on an idle machine (AVX2 CPU,
# ResNet-20) and 19% (AVX-512 BF16 CPU, ResNet-110 in bf16) (benchmarks/omp_wait_policy.py):
# OMP_WAIT=ACTIVE where nothing else will run. It matters only where a lane has more than one
# thread (LANES=1 on 2 cores, or one net left): a lane of one thread never waits for another.
OMP_WAIT ?= PASSIVE
# Eager. torch.compile of the step gained 1.05x on ResNet-56's synthetic step in bf16 on the
# AVX512-BF16 CPU (benchmarks/step_variants.py), but plain-110's real run, resumed each way
# in turns, trained 0.78x as fast compiled (benchmarks/compile_resume.py).
# CAMPAIGN_COMPILE=--compile compiles (never on a GPU: --compile turns off the CUDA graphs).
CAMPAIGN_COMPILE ?=
campaign: restore
	@test -e $(CIFAR10) || { echo "campaign: $(CIFAR10) not found (CIFAR10=PATH names the data)"; exit 2; }
	@mkdir -p $(CAMPAIGN_RUNS)/.locks $(CAMPAIGN_LOGS)
	@test $(LANES) -ge 1 2>/dev/null || { echo "campaign: LANES=$(LANES): a number of lanes, 1 or more"; exit 2; }; \
	todo=0; for m in $(CAMPAIGN_NETS); do test -f $(CAMPAIGN_RUNS)/$$m/summary.json || todo=$$((todo + 1)); done; \
	lanes=$$(( $(LANES) < todo ? $(LANES) : todo )); test $$lanes -gt 0 || { echo "campaign: every net has finished"; exit 0; }; \
	threads=$(LANE_THREADS); test -n "$$threads" || threads=$$(( $$(nproc) / lanes > 0 ? $$(nproc) / lanes : 1 )); \
	pids=""; for lane in $$(seq $$lanes); do \
	  ( for m in $(CAMPAIGN_NETS); do \
	      test -f $(CAMPAIGN_RUNS)/$$m/summary.json && continue; \
	      OMP_NUM_THREADS=$$threads OMP_WAIT_POLICY=$(OMP_WAIT) flock -n -E 75 $(CAMPAIGN_RUNS)/.locks/$$m \
	        $(VENV)/bin/deepres reproduce degradation --data $(CIFAR10) --budget $(CAMPAIGN_BUDGET) --val-split 0 \
	        --models $$m --runs $(CAMPAIGN_RUNS) --out $(CAMPAIGN_REPORTS)/$$m $(CAMPAIGN_COMPILE) \
	        >> $(CAMPAIGN_LOGS)/$$m.log 2>&1; \
	      code=$$?; test $$code = 75 && continue; \
	      test -f $(CAMPAIGN_RUNS)/$$m/summary.json || { echo "campaign lane $$lane: $$m stopped"; exit 1; }; \
	    done ) & \
	  pids="$$pids $$!"; sleep 5; \
	done; rc=0; for p in $$pids; do wait $$p || rc=1; done; exit $$rc

# Runs stay out of git, and a new machine starts without them. What a finished net needs to
# count again is in git: its shipped weights and the training record `make land` published
# beside them (config, metrics, summary in CAMPAIGN_RECORDS). `make restore` rebuilds each such
# run that runs/ lacks, so the campaign does not train it again and the reports keep it. An
# unfinished run has no such record: a lost one starts again.
CAMPAIGN_RECORDS ?= docs/results/campaign-runs
restore: setup
	@for m in $(CAMPAIGN_NETS); do \
	  test -f $(CAMPAIGN_RECORDS)/$$m/summary.json || continue; \
	  test -f $(CAMPAIGN_RUNS)/$$m/summary.json && continue; \
	  if test -e $(CAMPAIGN_RUNS)/$$m; then \
	    echo "restore: $(CAMPAIGN_RUNS)/$$m is unfinished beside the finished record of $$m; remove it to restore that"; \
	  else \
	    $(VENV)/bin/deepres restore --record $(CAMPAIGN_RECORDS)/$$m --out $(CAMPAIGN_RUNS)/$$m \
	      || echo "restore: $$m not restored; the campaign trains it again"; \
	  fi; \
	done

# Lands what the campaign finished: each finished net published once, with its training record,
# as NET-cifar10, then Table 6, Fig. 6 and Fig. 7 recomputed from all finished nets into
# docs/results/*-full. A name another run holds (ResNet-20, shipped in fp32 before records were
# kept) gets the run's precision: resnet20-cifar10-bf16. Each shipped net of the campaign is
# then checked once as a file with `deepres eval --json` on the first 1,000 training images of
# each class (training images: a check of the file, not a test error), unpacked whole or not at
# all (.part until done) so that a stopped unzip is not taken for the 10,000.
EVAL10K ?= runs/cifar10-train-first10k
land: restore
	@test -f $(CIFAR10) || { echo "land: $(CIFAR10) not found (CIFAR10=PATH names the zip)"; exit 2; }
	@for m in $(CAMPAIGN_NETS); do \
	  test -f $(CAMPAIGN_RECORDS)/$$m/summary.json || continue; \
	  test -f $(CAMPAIGN_RUNS)/$$m/summary.json || { \
	    echo "land: $$m ships, but $(CAMPAIGN_RUNS)/$$m is not its finished run (see restore above): the reports would leave it out"; exit 1; }; \
	done; \
	finished=""; for m in $(CAMPAIGN_NETS); do \
	  test -f $(CAMPAIGN_RUNS)/$$m/summary.json || continue; \
	  finished="$$finished,$$m"; \
	  $(VENV)/bin/deepres publish $(CAMPAIGN_RUNS)/$$m $$m-cifar10 --once --record $(CAMPAIGN_RECORDS)/$$m \
	    --command "make campaign: deepres reproduce degradation --data $(CIFAR10) --budget $(CAMPAIGN_BUDGET) --val-split 0 --models $$m --runs $(CAMPAIGN_RUNS)" \
	    > /dev/null || exit 1; \
	done; \
	test -n "$$finished" || { echo "land: no net of the campaign has finished"; exit 1; }; \
	for e in table6 degradation responses; do \
	  $(VENV)/bin/deepres reproduce $$e --data $(CIFAR10) --budget $(CAMPAIGN_BUDGET) --val-split 0 \
	    --models $${finished#,} --runs $(CAMPAIGN_RUNS) --out docs/results/$$e-$(CAMPAIGN_BUDGET) --quiet || exit 1; \
	done; \
	nets=$$($(PY) -c "import json; m = json.load(open('deepres/weights/manifest.json'))['nets']; \
	  print(' '.join(n for n, e in m.items() if '--budget $(CAMPAIGN_BUDGET) ' in e['command'] and '$(notdir $(CIFAR10))' in e['command']))") || exit 1; \
	for n in $$nets; do \
	  out=docs/results/table6-$(CAMPAIGN_BUDGET)/eval-$$n-train10k.json; test -f $$out && continue; \
	  test -d $(EVAL10K)/train || { rm -rf $(EVAL10K).part && \
	    unzip -q $(CIFAR10) 'train/*/0[0-9]*.jpg' -d $(EVAL10K).part && mv $(EVAL10K).part $(EVAL10K); } || exit 1; \
	  $(VENV)/bin/deepres eval $$n --data $(EVAL10K)/train --json > $(EVAL10K)/$$n.json && \
	    mv $(EVAL10K)/$$n.json $$out || exit 1; \
	done

# Where the campaign stands, finished nets and unfinished alike, for the README: the status of
# every run (with its training error over each 1,000 iterations, to compare runs at matched
# iterations) and one figure of every run's training curve so far.
# (status exits 2 naming a damaged run and still lists the others: those are kept.)
PROGRESS = docs/results/campaign-progress
progress: setup
	@$(VENV)/bin/deepres status $(CAMPAIGN_RUNS) --json --plot $(PROGRESS).png > $(PROGRESS).json.tmp; \
	code=$$?; if [ -s $(PROGRESS).json.tmp ]; then mv $(PROGRESS).json.tmp $(PROGRESS).json; \
	else rm -f $(PROGRESS).json.tmp; fi; exit $$code

# Issue 10's short runs: resnet18 and plain18 from scratch on the 245 training photos of
# hymenoptera (Sec. 3.4's augmentation, the ImageNet recipe over 30 epochs at batch 32), each
# tested with the three protocols. Small-data numbers; the JSON lands in docs/results.
PHOTOS ?= ../shared/data/hymenoptera.zip
PHOTO_EPOCHS ?= 30
# fp32 on every CPU: --precision auto would train in bf16 where the CPU has bf16 units, another
# experiment than the one docs/results/photos-scratch records.
PHOTO_PRECISION ?= fp32
photos: setup
	@test -e $(PHOTOS) || { echo "photos: $(PHOTOS) not found (PHOTOS=PATH names the data)"; exit 2; }
	@mkdir -p docs/results/photos-scratch
	@for m in resnet18 plain18; do \
	  run=runs/photos-scratch/$$m; \
	  if [ "$(PHOTO_PRECISION)" != auto ] && [ -f $$run/summary.json -o -f $$run/checkpoint.safetensors ] && \
	    [ "$$($(PY) -c "import json, sys; print(json.load(open(sys.argv[1]))['config'].get('precision'))" $$run/config.json)" != "$(PHOTO_PRECISION)" ]; then \
	    echo "photos: $$run trained in another precision than PHOTO_PRECISION=$(PHOTO_PRECISION); move it away to train anew"; exit 1; fi; \
	  if [ -f $$run/summary.json ]; then :; \
	  elif [ -f $$run/checkpoint.safetensors ]; then $(VENV)/bin/deepres train --resume $$run --quiet || exit 1; \
	  else rm -rf $$run; $(VENV)/bin/deepres train --model $$m --data $(PHOTOS) --epochs $(PHOTO_EPOCHS) --batch-size 32 \
	    --precision $(PHOTO_PRECISION) --checkpoint-every 50 --out $$run --quiet || exit 1; fi; \
	  mkdir -p docs/results/photos-scratch/$$m; \
	  cp $$run/config.json $$run/summary.json $$run/metrics.jsonl $$run/curves.png docs/results/photos-scratch/$$m/ || exit 1; \
	  for p in center 10crop multiscale; do \
	    $(VENV)/bin/deepres eval $$run --protocol $$p --json > docs/results/photos-scratch/$$m/eval-$$p.json || exit 1; \
	  done; \
	done

# The shipped CIFAR-10 ResNet-20 as a start for a small task of one's own: the 245 hymenoptera
# training photos at 32x32, trained from scratch, fine-tuned whole (lr 0.01) and with its fc
# alone trained, each with three seeds; the error on the 153 val photos lands in docs/results.
TRANSFER_SEEDS ?= 0 1 2
TRANSFER_OUT ?= docs/results/transfer-32px
transfer: setup
	@test -e $(PHOTOS) || { echo "transfer: $(PHOTOS) not found (PHOTOS=PATH names the data)"; exit 2; }
	@mkdir -p $(TRANSFER_OUT)
	@for v in scratch finetune fc; do for s in $(TRANSFER_SEEDS); do \
	  run=runs/transfer-32px/$$v-seed$$s; \
	  case $$v in scratch) opts="";; finetune) opts="--init resnet20-cifar10 --lr 0.01";; \
	    fc) opts="--init resnet20-cifar10 --freeze-backbone";; esac; \
	  if [ -f $$run/summary.json ]; then :; \
	  elif [ -f $$run/checkpoint.safetensors ]; then $(VENV)/bin/deepres train --resume $$run --quiet > /dev/null || exit 1; \
	  else rm -rf $$run; $(VENV)/bin/deepres train --model resnet20 \
	    --data $(PHOTOS) --image-size 32 --epochs $(PHOTO_EPOCHS) --batch-size 32 --seed $$s $$opts \
	    --out $$run --quiet > /dev/null || exit 1; fi; \
	  mkdir -p $(TRANSFER_OUT)/$$v-seed$$s; cp $$run/config.json $$run/summary.json $(TRANSFER_OUT)/$$v-seed$$s/ || exit 1; \
	  echo "$$v seed $$s: $$(grep -o '"test_error": [0-9.]*' $$run/summary.json)"; \
	done; done
