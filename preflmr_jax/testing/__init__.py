"""Test and benchmark support: a PyTorch reference PreFLMR and a GCS emulator. These modules import
the test extras (`requirements-test.txt`: torch, gcp-storage-emulator); training and evaluation
never import them."""
