"""vitq's quantization engine: sites, observers, fake-quant, configs and presets."""
