"""crossmodal: image-caption retrieval on MS-COCO (Faster R-CNN / FastText / BERT features,
triplet-trained 128-d heads, Faiss retrieval). Scripts at the repository root are thin entry
points into these modules."""

__version__ = "0.1.0"
