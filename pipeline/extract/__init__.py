"""The extraction engines: local (engine.py) and Ray (ray.py), both running worker.py's ClipWorker and RunWriter."""
