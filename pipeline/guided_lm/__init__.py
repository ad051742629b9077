"""Direction-supervised tiny LM (seed 000, idea 1): stage `guided_lm`."""
