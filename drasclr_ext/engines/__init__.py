"""Ignite engines for DrasCLR pretraining and fine-tuning."""
