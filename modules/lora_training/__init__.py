"""LoRA Training: dataset preparation and training (UI-free core + a thin Gradio tab)."""
