"""`raytrain predict`: a trained checkpoint on images, folders, globs, videos and bucket
prefixes -> one JSON line per person (SMPL pose and shape, camera, 2D joints), with
optional mesh renders and vertices.

``options`` (the flags), ``inputs`` (what is read and admitted: sources, units,
detections), ``crop`` (person crops as the validation loader cuts them), ``model`` (the
trained network), ``detect`` (a local torchvision detector), ``overlay`` (renders),
``run`` (the single-process path) and ``ray`` (the same on Ray Data).
"""
