"""Scoring detections: COCO metrics (faster-coco-eval / pycocotools), Pascal VOC mAP, evaluation passes over a
dataset, and the report pictures."""
