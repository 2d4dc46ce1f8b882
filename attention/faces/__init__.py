"""Faces for the face nodes, Infinite-ID and the metrics.

    insightface_backend.py  finding, loading and running an insightface pack: detection, ArcFace
                            alignment (``norm_crop``), embeddings; insightface, onnxruntime and cv2
                            are imported only when a node runs
"""
