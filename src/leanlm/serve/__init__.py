"""OpenAI-compatible serving: FastAPI app, continuous-batching scheduler, request schemas, metrics.

Importing this package is light; ``leanlm.serve.server`` pulls in uvicorn and the app.
"""
