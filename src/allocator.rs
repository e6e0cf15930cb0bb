//! The allocator the `switchyard` binary runs on, and how it is set up: mimalloc, for Rust's
//! allocations and the C libraries' alike, giving freed memory back lazily, without transparent
//! huge pages. The routing benchmark uses the same, so that the router is measured as it ships.

/// mimalloc rather than glibc's allocator: the router allocates and frees per record, and
/// `scripts/bench-routing` measured 71.0k / 71.4k events/s with glibc against 81.1k / 74.5k with
/// mimalloc (alternated, a fresh broker per run).
///
/// The C libraries allocate with it too: `libmimalloc-sys` is built with its `override` feature,
/// so the process's `malloc` and `free` are mimalloc's. librdkafka allocates per record it
/// produces (the message, its header list) and per fetched message; with glibc's allocator that
/// was 8 % of the route task's samples (`_int_malloc`, `malloc_consolidate`). Alternated twice with
/// 30,000 events, router CPU per event with two work items 22.7 / 21.3 µs with glibc's `malloc`
/// underneath librdkafka, 20.0 / 18.0 µs with mimalloc's (60.9k / 62.4k against 70.2k / 70.8k
/// events/s).
pub type Allocator = mimalloc::MiMalloc;

/// `mi_option_purge_decommits`: its place in `mi_option_t` (`mimalloc.h`, mimalloc 2 and 3), which
/// `libmimalloc-sys` does not name.
const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

/// Sets the allocator up; call it first in `main`, before any other thread starts.
///
/// Freed memory: mimalloc hands memory it no longer uses back to the kernel about a second later.
/// By default it does so with `MADV_DONTNEED`, so the next allocation there takes a page fault and
/// a zeroed page, and the router's memory churns with every batch (records, decisions, work items).
/// This makes it use `MADV_FREE`: the kernel takes those pages back only when it needs memory,
/// until then they count in the process's RSS, and reusing them costs nothing.
/// `scripts/bench-routing` with 50,000 events, this against mimalloc's default alternated six
/// times: router CPU per event with two work items 2-5 µs lower (8-17 %) in five pairs, higher in
/// one run during a busy spell; with one work item within noise. `MIMALLOC_PURGE_DECOMMITS=1` in
/// the environment restores mimalloc's default.
///
/// Huge pages: mimalloc asks for transparent huge pages (`MADV_HUGEPAGE`), so where the kernel
/// grants them each first touch of new memory stops the touching thread to zero 2 MiB (in a
/// latency run's profile, 8 % of the process's samples), or longer when the kernel compacts memory
/// to find them. This turns them off for the process (`PR_SET_THP_DISABLE`, which children
/// inherit), as mimalloc's own `MIMALLOC_ALLOW_THP=0` does; setting `MIMALLOC_ALLOW_THP` in the
/// environment leaves the choice to mimalloc. In `scripts/bench-routing` (50,000 events, the
/// router's three latency runs at half its rate, each a new router in the same process) the first
/// run, while the heap grows, had a p99 of 47-72 ms in six invocations with huge pages (97 once, in
/// a busy spell) and 17-29 ms in four without; the later runs and the CPU per event did not differ
/// beyond noise.
pub fn configure() {
    // SAFETY: writes one option's default value; no other thread reads options yet (see above),
    // and an option set from the environment keeps its value.
    unsafe { libmimalloc_sys::mi_option_set_default(PURGE_DECOMMITS, 0) }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: sets a flag of this process; no pointer is passed. An error (a kernel without
        // the call) leaves huge pages as they were: slower first touches, nothing worse.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether transparent huge pages are off for this process.
    fn huge_pages_disabled() -> bool {
        // SAFETY: reads a flag of this process; no pointer is passed.
        unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 }
    }

    fn option(option: libmimalloc_sys::mi_option_t) -> std::os::raw::c_long {
        // SAFETY: reads an option; only this test touches mimalloc's options in this process.
        unsafe { libmimalloc_sys::mi_option_get(option) }
    }

    #[test]
    fn c_allocations_go_to_mimalloc() {
        // SAFETY: allocates one block through the C allocator, asks mimalloc about its address
        // (no access), and frees it.
        let ours = unsafe {
            let block = libc::malloc(64);
            assert!(!block.is_null());
            let ours = libmimalloc_sys::mi_is_in_heap_region(block);
            libc::free(block);
            ours
        };
        assert!(
            ours,
            "the C libraries allocate with glibc's malloc, not mimalloc's"
        );
    }

    #[test]
    fn configure_makes_purges_reset_pages_and_turns_huge_pages_off() {
        // The place is right: its neighbours' defaults (arena_eager_commit 2, allow_large_os_pages
        // 0) and purge_delay's (1,000 ms, ten places on) differ from purge_decommits' 1.
        assert_eq!(option(PURGE_DECOMMITS - 1), 2);
        assert_eq!(option(PURGE_DECOMMITS + 1), 0);
        assert_eq!(option(PURGE_DECOMMITS + 10), 1000);
        assert_eq!(option(PURGE_DECOMMITS), 1, "mimalloc's default");
        configure();
        assert_eq!(option(PURGE_DECOMMITS), 0);
        assert!(
            std::env::var_os("MIMALLOC_ALLOW_THP").is_some() || huge_pages_disabled(),
            "transparent huge pages are still on"
        );
    }
}
