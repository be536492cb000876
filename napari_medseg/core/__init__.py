"""Qt-free engine: image I/O, tiled inference, instances, training, fine-tuning, metrics, export."""
