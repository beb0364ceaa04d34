/* qcbt: MIN and MAX that evaluate their arguments once and nest (the
 * temporaries get unique names, so MIN(MAX(a, b), c) does not shadow).
 */
#ifndef QCBT_MINMAX_H
#define QCBT_MINMAX_H

#define MINMAX_CAT_(a, b) a##b
#define MINMAX_CAT(a, b)  MINMAX_CAT_(a, b)

#define MINMAX_PICK_(a, b, op, ua, ub) \
    ({                                 \
        __typeof__(a) ua = (a);        \
        __typeof__(b) ub = (b);        \
        ua op ub ? ua : ub;            \
    })

#undef MIN
#define MIN(a, b)                                 \
    MINMAX_PICK_(a,                               \
                 b,                               \
                 <,                               \
                 MINMAX_CAT(min_a_, __COUNTER__), \
                 MINMAX_CAT(min_b_, __COUNTER__))
#undef MAX
#define MAX(a, b)                                 \
    MINMAX_PICK_(a,                               \
                 b,                               \
                 >,                               \
                 MINMAX_CAT(max_a_, __COUNTER__), \
                 MINMAX_CAT(max_b_, __COUNTER__))

#endif /* QCBT_MINMAX_H */
