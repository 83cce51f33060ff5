"""Caption splits (COCO, Flickr8k, Flickr30k) and the two triplet datasets (the project's one dataset module).

- :func:`load_split` reads ``<coco-root>/annotations/captions_<split>.json`` (pycocotools),
  Flickr8k / Flickr30k's official files, or a Karpathy ``dataset_{coco,flickr8k,flickr30k}.json``
  into a :class:`CaptionSplit` (``--dataset``, default auto; docs/datasets.md); :func:`load_image`
  decodes any image to RGB.
- :class:`TripletCOCO_Img2Text` (image, +caption, -caption) and
  :class:`TripletCOCO_Text2Img` (caption, +image, -image) over cached feature rows.

Run it to check a split and print its counts::

    python coco_triplet_dataset.py --coco-root ../shared/data/coco-tiny --split train
    python coco_triplet_dataset.py --coco-root ../shared/data/flickr8k --split dev
"""

import argparse

from crossmodal.cli import add_data_args, run_script
from crossmodal.coco import CaptionSplit, load_image, load_split
from crossmodal.errors import DataError
from crossmodal.triplets import TripletCOCO_Img2Text, TripletCOCO_Text2Img

__all__ = ["CaptionSplit", "DataError", "TripletCOCO_Img2Text", "TripletCOCO_Text2Img", "load_image", "load_split"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Read a caption split (COCO, Flickr8k, Flickr30k) and print its summary.")
    add_data_args(p)
    p.add_argument("--check-images", action="store_true", help="decode every image too")
    a = p.parse_args(argv)
    split = load_split(a.coco_root, a.split, a.karpathy_file, skip_bad=a.skip_bad, dataset=a.dataset)
    if a.check_images:
        for i, iid in enumerate(split.image_ids):
            load_image(split.image_path(i), int(iid))
    print(split.summary())
    return split


if __name__ == "__main__":
    run_script(main)
