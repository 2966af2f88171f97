"""`fdiff demo`: a Gradio app that samples, interpolates and edits with a trained model.

`engine` computes (no UI; sampling goes through `fdiff_jax.generate`), `app` is the
Gradio page (gradio is imported there only: `pip install -e ".[demo]"`), and
`browser` drives a running demo in headless Chromium for the test and `--measure`.
"""
