/* qcbt backup of a local image: the qcbt-server qcbt starts for it, the
 * image lock qcbt holds meanwhile, and the checkpoint it creates after
 * the backup is recorded (qcbt backup --checkpoint NEW).
 *
 * Atomicity: qcbt holds the READ image lock (io.h: unshares "write", as
 * `qemu-img info`) on the chain's top layer from before the server starts
 * until the new checkpoint exists, so no writer gets in between the
 * backup's point in time and the checkpoint: the checkpoint describes
 * exactly the changes after the backup.  Only once the backup is
 * recorded and the server has exited is the lock upgraded to WRITE and
 * the bitmap created.
 *
 * The server is started by socket activation: qcbt binds and listens on a
 * unix socket in a private temporary directory, then starts qcbt-server
 * with it as descriptor 3 (LISTEN_FDS=1, LISTEN_PID), so the socket
 * accepts connections before the server runs (no waiting for readiness).
 * It dies with qcbt (PR_SET_PDEATHSIG); on SIGINT, SIGTERM and SIGHUP
 * qcbt kills it, waits for it and removes the directory before dying of
 * the signal itself.
 */
#ifndef QCBT_CLIENT_LOCAL_SOURCE_H
#define QCBT_CLIENT_LOCAL_SOURCE_H

#include <stdbool.h>
#include <stddef.h>

struct local_source;

/* True when ARG names an NBD export (SCHEME://...) rather than an image
 * file: a scheme of letters, digits, '+', '-', '.' followed by "://".
 */
bool local_source_is_uri(const char *arg);

/* Open IMAGE and its backing chain holding the READ image lock on every
 * layer, the top one for reading and writing when WRITABLE (to create a
 * checkpoint in it later).  A file another process writes is refused
 * ("held by another process").  Returns 0 and *out or -errno with a
 * message.
 */
int
local_source_open(const char *image, bool writable, struct local_source **out);

/* Can checkpoint NAME be created in the top layer after the backup?  It
 * must be a valid bitmap name, the top layer a qcow2 v3 image with a
 * valid bitmap directory, and no layer may hold a bitmap NAME.  Returns
 * 0 or -errno with a message.
 */
int local_source_check_new(struct local_source *ls, const char *name);

/* Can the merged bitmap NAME be published (the merge engine's tolerant
 * rules, as qcbt-server applies them)?  Returns 1, or 0 with the reason
 * in WHY, or -errno (out of memory).  NOTE is called with each notice of
 * the merge (a layer contributing its allocation map).
 */
int local_source_bitmap_usable(struct local_source *ls,
                               const char *name,
                               char *why,
                               size_t len,
                               void (*note)(const char *text));

/* Start qcbt-server for the chain, publishing BITMAP (NULL: none),
 * accepting CONNECTIONS clients.  Returns 0 or -errno with a message.
 */
int local_source_start(struct local_source *ls,
                       const char *bitmap,
                       unsigned connections);

/* The nbd+unix URI of the running server. */
const char *local_source_uri(const struct local_source *ls);

/* Test hook (QCBT_TEST_FAIL_AT=kill-server): SIGKILL the server now. */
void local_source_kill_server(struct local_source *ls);

/* Stop the server (after the client closed its connections): SIGTERM,
 * wait for it.  Idempotent.
 */
void local_source_stop(struct local_source *ls);

/* After a failure: when the server ended by itself (died, was killed,
 * exited with an error), add to the current error message how, with the
 * last line it printed.  Stops the server first.
 */
void local_source_explain(struct local_source *ls);

/* Create checkpoint NAME in the top layer: the server must be stopped;
 * the lock is upgraded to WRITE and an enabled persistent bitmap NAME is
 * added.  Returns 0 or -errno with a message.
 */
int local_source_create_checkpoint(struct local_source *ls, const char *name);

/* The top layer's path as given, and its absolute form (for records). */
const char *local_source_image(const struct local_source *ls);
const char *local_source_abspath(const struct local_source *ls);

/* Stop the server, close the chain (dropping the locks), remove the
 * temporary directory.  NULL is a no-op.
 */
void local_source_free(struct local_source *ls);

#endif /* QCBT_CLIENT_LOCAL_SOURCE_H */
