//! Returning freed memory to the operating system after a burst.
//!
//! Connection buffers are freed when idle, but glibc's allocator keeps freed memory in its
//! arenas unless it sits at the very top of the heap, so a server that once handled a burst
//! would keep that resident memory for good. `malloc_trim` hands free pages back. The event
//! loop calls this at most once per sweep (one second), and only after the sweep freed a
//! sizeable amount of buffers or many connections closed since the last one.

/// Returns free heap pages to the OS where the allocator supports it (glibc); elsewhere a no-op.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back_free_memory() {
    // SAFETY: malloc_trim only releases memory that the allocator holds as free; it touches
    // no live allocation and is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_free_memory() {}
