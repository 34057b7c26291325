"""The pocket world and model: a procedural world of captioned scenes, subjects, scorers, and a
small pretrained IF-style cascade, so the whole method runs (and is measured) on CPU."""
