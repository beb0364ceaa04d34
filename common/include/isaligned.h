/* qcbt: alignment test for power-of-two alignments. */
#ifndef QCBT_ISALIGNED_H
#define QCBT_ISALIGNED_H

#define IS_ALIGNED(n, a) (((n) & ((__typeof__(n))(a)-1)) == 0)

#endif /* QCBT_ISALIGNED_H */
