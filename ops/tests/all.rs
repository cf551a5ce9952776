//! Integration tests of the ops crate, one binary (faster to build, smaller to carry to the GPU).

mod autograd;
mod cuda;
mod parity;
mod random_shapes;
mod scan;

/// Held by every CUDA test of this binary for its whole run. They share the process's one device, whose
/// allocation counters one test reads and whose NaN poisoning (a process-wide switch) others turn on and off:
/// run side by side, they would see each other's allocations and switch poisoning off under each other.
pub fn cuda_serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
