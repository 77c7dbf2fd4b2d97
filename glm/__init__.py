"""ChatGLM inference engine."""
