"""The bundled demo: a tiny CLIP trained on synthetic coloured shapes, and their generator."""
