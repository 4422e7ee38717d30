//! The GPU build of ONNX Runtime and the device check.
//!
//! - `cargo xtask setup --gpu`: the usual set-up, then `onnxruntime-gpu` (the same 1.22 API as
//!   the CPU build) and the CUDA 12 libraries its CUDA provider links against, all from their
//!   PyPI wheels, unpacked into `target/onnxruntime-gpu/` (the ONNX Runtime libraries) and
//!   `target/onnxruntime-gpu/cuda/` (cudart, cuBLAS, cuDNN, cuFFT, cuRAND, NVRTC). Nothing is
//!   installed system-wide; the NVIDIA driver comes from the machine.
//! - `cargo xtask gpu-check`: on a machine with an NVIDIA GPU, bench/gpu_check.py against a
//!   release `weft`: every datatype the CUDA provider computes matches the CPU result, `wide`
//!   behind the batcher at c=64 against the in-process batch-of-64 limit, the GPU's utilization
//!   during that load, and the refusals that replace a silent CPU fallback.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The GPU build with the C API the `ort` crate expects (1.22, as the CPU build's 1.22.1; PyPI
/// has no onnxruntime-gpu 1.22.1).
pub const ORT_GPU_VERSION: &str = "1.22.0";

/// The CUDA 12 libraries `libonnxruntime_providers_cuda.so` needs (its `cuda` and `cudnn`
/// extras, and cuBLAS which cuDNN pulls in), pinned so every machine gets the same ones.
const CUDA_WHEELS: &[&str] = &[
    "nvidia-cuda-runtime-cu12==12.9.79",
    "nvidia-cuda-nvrtc-cu12==12.9.86",
    "nvidia-cublas-cu12==12.9.1.4",
    "nvidia-cufft-cu12==11.4.1.4",
    "nvidia-curand-cu12==10.3.10.19",
    "nvidia-cudnn-cu12==9.10.2.21",
];

/// Where the GPU build's `libonnxruntime.so` ends up (pass it with `--ort-library`).
pub fn ort_gpu_library(root: &Path) -> PathBuf {
    root.join("target/onnxruntime-gpu")
        .join(format!("libonnxruntime.so.{ORT_GPU_VERSION}"))
}

/// The folder of the CUDA libraries (put it on `LD_LIBRARY_PATH`).
pub fn cuda_libraries(root: &Path) -> PathBuf {
    root.join("target/onnxruntime-gpu/cuda")
}

/// Fetches and unpacks the GPU build and the CUDA libraries, unless already there.
pub fn setup(root: &Path) -> Result<()> {
    let library = ort_gpu_library(root);
    let cuda = cuda_libraries(root);
    let stamp = cuda.join("weft-wheels.txt");
    let wanted = CUDA_WHEELS.join("\n");
    if library.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        print_use(root);
        return Ok(());
    }
    let dir = root.join("target/onnxruntime-gpu");
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels)?;
    std::fs::create_dir_all(&cuda)?;
    eprintln!(
        "xtask: fetching onnxruntime-gpu {ORT_GPU_VERSION} and the CUDA 12 libraries from PyPI \
         (about 3 GB)"
    );
    // Only the shared libraries are used, so any platform tag of this OS and CPU will do; pip
    // picks the ones for this Python.
    run_pip_download(
        &wheels,
        &[format!("onnxruntime-gpu=={ORT_GPU_VERSION}")]
            .into_iter()
            .chain(CUDA_WHEELS.iter().map(|pin| pin.to_string()))
            .collect::<Vec<_>>(),
    )?;
    let unpack = format!(
        "import glob, os, sys, zipfile\n\
         wheels, ort_dir, cuda_dir = sys.argv[1:4]\n\
         for wheel in sorted(glob.glob(wheels + '/*.whl')):\n\
         \x20   with zipfile.ZipFile(wheel) as z:\n\
         \x20       for name in z.namelist():\n\
         \x20           base = os.path.basename(name)\n\
         \x20           if '.so' not in base or 'pybind' in base:\n\
         \x20               continue\n\
         \x20           if name.startswith('onnxruntime/capi/'):\n\
         \x20               target = os.path.join(ort_dir, base)\n\
         \x20           elif name.startswith('nvidia/') and '/lib/' in name:\n\
         \x20               target = os.path.join(cuda_dir, base)\n\
         \x20           else:\n\
         \x20               continue\n\
         \x20           with open(target + '.partial', 'wb') as out:\n\
         \x20               out.write(z.read(name))\n\
         \x20           os.replace(target + '.partial', target)\n\
         missing = [n for n in ['libonnxruntime.so.{ORT_GPU_VERSION}', \
         'libonnxruntime_providers_cuda.so', 'libonnxruntime_providers_shared.so'] \
         if not os.path.isfile(os.path.join(ort_dir, n))]\n\
         missing += [n for n in ['libcudart.so.12', 'libcublas.so.12', 'libcublasLt.so.12', \
         'libcudnn.so.9', 'libcufft.so.11', 'libcurand.so.10', 'libnvrtc.so.12'] \
         if not os.path.isfile(os.path.join(cuda_dir, n))]\n\
         if missing:\n\
         \x20   sys.exit('the wheels lack ' + ', '.join(missing))\n"
    );
    crate::run(
        Command::new("python3")
            .args(["-c", &unpack])
            .arg(&wheels)
            .arg(&dir)
            .arg(&cuda),
    )
    .context("cannot unpack the GPU wheels")?;
    let _ = std::fs::remove_dir_all(&wheels);
    std::fs::write(&stamp, wanted)?;
    print_use(root);
    Ok(())
}

fn run_pip_download(into: &Path, pins: &[String]) -> Result<()> {
    crate::run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .arg("--only-binary=:all:")
            .args(pins)
            .arg("-d")
            .arg(into),
    )
    .context("pip could not download the GPU wheels (is PyPI reachable?)")
}

fn print_use(root: &Path) {
    eprintln!(
        "xtask: GPU build ready; serve CUDA models with\n\
         \x20 LD_LIBRARY_PATH={} weft serve --ort-library {} ...",
        cuda_libraries(root).display(),
        ort_gpu_library(root).display()
    );
}

/// `cargo xtask gpu-check`: the device check of bench/gpu_check.py with a release build.
pub fn check(root: &Path, weft: &Path, args: &[String]) -> Result<()> {
    let script = root.join("bench/gpu_check.py");
    let status = Command::new(crate::venv_python(root))
        .current_dir(root)
        .arg(&script)
        .arg("--weft")
        .arg(weft)
        .arg("--ort-gpu")
        .arg(ort_gpu_library(root))
        .arg("--ort-cpu")
        .arg(crate::ort_library(root))
        .arg("--cuda-libraries")
        .arg(cuda_libraries(root))
        .arg("--work")
        .arg(root.join("target/gpu-check"))
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("the GPU device check failed ({status}); its output above says which check");
    }
    Ok(())
}
