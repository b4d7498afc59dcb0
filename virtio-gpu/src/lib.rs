//! carrel-gpu: the virtio-gpu 2D device. Not built yet: see the screen issue.
