"""The trainer behind ``fastpref train``: SD1.5/SDXL preference fine-tuning on diffusers,
accelerate and peft. It uses the loss only through fastpref's public API."""
