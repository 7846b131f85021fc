"""The HTTP routes, one `APIRouter` per API: openai (models, completions, chat, embeddings), tokenizer,
trace, ops (health, metrics). app.py includes them all; the logic they share is serving.py's."""
