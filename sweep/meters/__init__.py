"""Ways of measuring a worker's own GPUs: energy windows per request (`zeus`) and a
power timeline (`timeline`)."""
