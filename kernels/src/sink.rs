//! A row-major output shared by parallel units that each write a disjoint rectangle (row-major
//! rows cannot be split into column rectangles with safe slices). Owns nothing but the pointer;
//! the units' partition is the callers' to guarantee.

pub(crate) struct OutSink {
    ptr: *mut f32,
    len: usize,
    /// Row length.
    pub n: usize,
}

// SAFETY: the pointer comes from a `&mut [f32]` that outlives the parallel section (the sink
// borrows nothing, so callers keep the slice borrowed for as long as they use it), and `row_ptr`'s
// contract (disjoint rectangles) rules out data races.
unsafe impl Sync for OutSink {}

impl OutSink {
    pub fn new(out: &mut [f32], n: usize) -> Self {
        OutSink { ptr: out.as_mut_ptr(), len: out.len(), n }
    }

    /// Pointer to `out[row, col]`, with `cols` elements from there in bounds (checked).
    /// # Safety
    /// No other thread may touch `out[row, col..col + cols]` while the pointer is used, and the
    /// slice the sink was made from must still be borrowed by the caller.
    pub unsafe fn row_ptr(&self, row: usize, col: usize, cols: usize) -> *mut f32 {
        let at = row * self.n + col;
        assert!(col + cols <= self.n && at + cols <= self.len, "sink: ({row}, {col}+{cols}) out of bounds");
        // SAFETY: in bounds (asserted).
        unsafe { self.ptr.add(at) }
    }

    /// Writes `vals` to `out[row, col..col + vals.len()]`.
    /// # Safety
    /// As for `row_ptr`.
    pub unsafe fn write(&self, row: usize, col: usize, vals: &[f32]) {
        // SAFETY: the caller's contract; `row_ptr` checks bounds.
        unsafe { std::ptr::copy_nonoverlapping(vals.as_ptr(), self.row_ptr(row, col, vals.len()), vals.len()) };
    }
}
