# Sourced at the start of a call on the lent GPU machine (../shared/DEVICE.md): stage the extra packages and
# the stand-in model, put them on PYTHONPATH, keep NVLink multicast off.
bash .devshared/tools/device-stage
export PYTHONPATH=/tmp/t2s-device/whl:/tmp/t2s-device/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && [ ! -d /tmp/t2s-device/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/t2s-device/whl .whl/*.whl
fi
python3 -c "import torch, transformers, peft, trl, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
