"""Training: the run (:func:`multibox.engine.fit.fit`), one epoch, optimisers and schedules, resumable state."""
