"""What the process backends share: cloudpickle payloads and outcomes (``remote``) and
out-of-band buffers for large arrays and bytes (``shm``). Imported by workers: keep it light."""
