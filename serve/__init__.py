"""Ray Serve for unigap: a run's model over HTTP (serve/app.py), and a typed client (serve/client.py).

Nothing is imported here, so `import serve.app` (what `unigap --help` does) stays cheap; ray is only
imported when an app is built (serve/deployment.py).
"""
