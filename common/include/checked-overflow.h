/* qcbt: arithmetic on untrusted values that reports overflow.
 * Each returns true when the result overflowed (like the builtins).
 */
#ifndef QCBT_CHECKED_OVERFLOW_H
#define QCBT_CHECKED_OVERFLOW_H

#define ADD_OVERFLOW(a, b, r) __builtin_add_overflow((a), (b), (r))
#define MUL_OVERFLOW(a, b, r) __builtin_mul_overflow((a), (b), (r))

#endif /* QCBT_CHECKED_OVERFLOW_H */
