//! virtio-input (device id 18): the guest's keyboard and absolute-pointer tablet.
