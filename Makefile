# make demo: install into .venv, then run stage 0 → stage 1 → stage 2 end to end on a tiny
#            offline Stable Diffusion stack (no download).
# make test: install into .venv, then run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)
DEMO   ?= outputs/demo
export HF_HUB_OFFLINE = 1
export PYTHONUNBUFFERED = 1

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) -m coerasing.testing $(DEMO)/stack
	$(PY) generate_data.py --label nudity --ckpt_path $(DEMO)/stack/sd --output_dir $(DEMO)/generation_dataset \
		--num_images 8 --batch_size 4 --num_inference_steps 10 --device cpu
	$(PY) erase_pipeline.py --modality text --prompt 'nudity' --train_method noxattn --iterations 20 \
		--ckpt_path $(DEMO)/stack/sd --output_dir $(DEMO)/checkpoints --save_iter 10 --devices cpu
	$(PY) erase_pipeline.py --modality image --train_method noxattn --text_uncond --prompt 'nudity' \
		--unet_ckpt_path $(DEMO)/checkpoints/text/nudity/unet/unet.pth --image $(DEMO)/generation_dataset/nudity \
		--image_number 8 --text_guide nudity --blur_factor 3 --iterations 20 --negative_guidance 1.0 \
		--ckpt_path $(DEMO)/stack/sd --ip_adapter $(DEMO)/stack/ip_adapter/models/ip-adapter_sd15.bin \
		--image_encoder_path $(DEMO)/stack/ip_adapter/models/image_encoder --output_dir $(DEMO)/checkpoints \
		--save_iter 10 --devices cpu
	$(PY) -m coerasing.inspect_checkpoint $(DEMO)/checkpoints/image/nudity/unet_noxattn_im8_ng1.0_it20/unet.pth \
		--ckpt_path $(DEMO)/stack/sd --out $(DEMO)/sample.png

clean:
	rm -rf $(VENV) outputs
