/* qcbt: rounding to powers of two.  Callers check for overflow first. */
#ifndef QCBT_ROUNDING_H
#define QCBT_ROUNDING_H

#define ROUND_UP(n, a)     (((n) + (a)-1) & ~((__typeof__(n))(a)-1))
#define ROUND_DOWN(n, a)   ((n) & ~((__typeof__(n))(a)-1))
#define DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))

#endif /* QCBT_ROUNDING_H */
