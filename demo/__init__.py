"""The Gradio demo over the runtime (`python -m demo`; the page is built by demo.app.build_app)."""
