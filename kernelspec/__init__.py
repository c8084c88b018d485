"""The kernelspec files (kernel.json, logos) installed by `dhvm kernel install`."""
