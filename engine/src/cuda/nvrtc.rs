//! NVRTC: CUDA C++ source to a CUBIN for one GPU architecture. [`super::CudaDevice::function`] calls this
//! once per module and device and caches the loaded module.
//!
//! The target is the device's real architecture (`--gpu-architecture=sm_90` on an H100), so NVRTC emits
//! machine code (a CUBIN) that the driver loads as is, with no PTX JIT step at load time.
//!
//! This goes through cudarc's result-level NVRTC calls rather than `compile_ptx`, which panics on a source
//! with a NUL byte and when the log cannot be read; here every failure is an `Error::Nvrtc` with the log.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use super::device::{catch_panics, library_present, Library};
use crate::{Error, Result};

/// Compiles `source` for `arch` (e.g. `sm_90`) and returns the CUBIN image.
pub(crate) fn compile(module: &'static str, source: &str, arch: &str) -> Result<Vec<u8>> {
    let fail = |log: String| Error::Nvrtc { module, log };
    if !library_present(Library::Nvrtc) {
        return Err(fail(format!(
            "libnvrtc could not be loaded (searched {}); install the CUDA toolkit's NVRTC or add it to LD_LIBRARY_PATH",
            Library::Nvrtc.candidates().join(", ")
        )));
    }
    let src = CString::new(source).map_err(|_| fail("the source contains a NUL byte".into()))?;
    let name = CString::new(format!("{module}.cu")).map_err(|_| fail("the module name contains a NUL byte".into()))?;
    let options = vec![format!("--gpu-architecture={arch}")];
    // SAFETY: `src` and `name` outlive the program, which `compile_program` destroys before returning.
    catch_panics("nvrtc", || unsafe { compile_program(&src, &name, &options) }).map_err(fail)
}

/// Destroys the program on every path out of [`compile_program`].
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program` and destroyed only here. A failure to destroy leaks the program,
        // which is all that can be done about it.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

/// # Safety
/// `src` and `name` must outlive the call.
unsafe fn compile_program(src: &CString, name: &CString, options: &[String]) -> std::result::Result<Vec<u8>, String> {
    let prog = Program(result::create_program(src, Some(name)).map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?);
    let compiled = result::compile_program(prog.0, options);
    let log = match result::get_program_log(prog.0) {
        Ok(raw) => c_chars_to_string(&raw),
        Err(e) => format!("(the compile log could not be read: {e:?})"),
    };
    if let Err(e) = compiled {
        return Err(format!("{e:?} with options {options:?}\n{log}"));
    }
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog.0, &mut size).result().map_err(|e| format!("nvrtcGetCUBINSize: {e:?}\n{log}"))?;
    if size == 0 {
        return Err(format!(
            "NVRTC produced no CUBIN for options {options:?} (is the architecture a real one?)\n{log}"
        ));
    }
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>())
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e:?}\n{log}"))?;
    Ok(cubin)
}

/// NVRTC's log is a NUL-terminated C string.
fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}
