"""Kubernetes files shipped with dhg_kernel: the kernel pod template and the image definition."""
