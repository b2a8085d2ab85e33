"""CUDA's host registration, recorded, for machines without a GPU: which memory would be page-locked, how much,
and when it is released."""


class RecordingCudart:
    """torch.cuda.cudart()'s host-registration calls, recorded; `refuse` makes registration fail like a driver would."""

    class cudaError:
        success = 0

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr, size, flags):
        if self.refuse:
            return 2  # cudaErrorMemoryAllocation
        assert flags == 0 and ptr not in self.registered
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        assert ptr in self.registered and ptr not in self.unregistered
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, error):
        return "out of memory"
