"""Browser UI over the runs folder (Gradio)."""
