//! The allocator the `switchyard` binary runs on, and how it is set up: mimalloc, giving freed
//! memory back lazily. The routing benchmark uses the same, so that the router is measured as it
//! ships.

/// mimalloc rather than glibc's allocator: the router allocates and frees per record, and
/// `scripts/bench-routing` measured 71.0k / 71.4k events/s with glibc against 81.1k / 74.5k with
/// mimalloc (alternated, a fresh broker per run).
pub type Allocator = mimalloc::MiMalloc;

/// `mi_option_purge_decommits`: its place in `mi_option_t` (`mimalloc.h`, mimalloc 2 and 3), which
/// `libmimalloc-sys` does not name.
const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

/// Sets the allocator's defaults; call it first in `main`, before any other thread starts.
///
/// mimalloc hands memory it no longer uses back to the kernel about a second later. By default it
/// does so with `MADV_DONTNEED`, so the next allocation there takes a page fault and a zeroed page,
/// and the router's memory churns with every batch (records, decisions, work items). This makes it
/// use `MADV_FREE`: the kernel takes those pages back only when it needs memory, until then they
/// count in the process's RSS, and reusing them costs nothing. `scripts/bench-routing` with 50,000
/// events, this against mimalloc's default alternated six times: router CPU per event with two work
/// items 2-5 µs lower (8-17 %) in five pairs, higher in one run during a busy spell; with
/// one work item within noise. `MIMALLOC_PURGE_DECOMMITS=1` in the environment restores mimalloc's
/// default.
pub fn configure() {
    // SAFETY: writes one option's default value; no other thread reads options yet (see above),
    // and an option set from the environment keeps its value.
    unsafe { libmimalloc_sys::mi_option_set_default(PURGE_DECOMMITS, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(option: libmimalloc_sys::mi_option_t) -> std::os::raw::c_long {
        // SAFETY: reads an option; only this test touches mimalloc's options in this process.
        unsafe { libmimalloc_sys::mi_option_get(option) }
    }

    #[test]
    fn configure_makes_purges_reset_pages_rather_than_decommit_them() {
        // The place is right: its neighbours' defaults (arena_eager_commit 2, allow_large_os_pages
        // 0) and purge_delay's (1,000 ms, ten places on) differ from purge_decommits' 1.
        assert_eq!(option(PURGE_DECOMMITS - 1), 2);
        assert_eq!(option(PURGE_DECOMMITS + 1), 0);
        assert_eq!(option(PURGE_DECOMMITS + 10), 1000);
        assert_eq!(option(PURGE_DECOMMITS), 1, "mimalloc's default");
        configure();
        assert_eq!(option(PURGE_DECOMMITS), 0);
    }
}
