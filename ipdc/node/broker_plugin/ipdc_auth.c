/*
 * ipdc_auth: the IPDC broker's identity plugin for mosquitto 2.0.x (plugin API v5).
 * It binds every MQTT session to the node identity in its TLS client certificate.
 *
 * Built and loaded by IPDC itself (ipdc/node/install.py, ipdc/node/broker.py):
 *     plugin /path/ipdc_auth-<hash>.so
 *     plugin_opt_revoked_file /path/revoked           (required)
 *     plugin_opt_enroll_used_file /path/enroll-used   (required)
 *     plugin_opt_enroll_prefix enroll-                (optional, default "enroll-")
 *     plugin_opt_enroll_topic_root ipdc/enroll/       (optional, default "ipdc/enroll/")
 * on a TLS listener with `require_certificate true` and WITHOUT
 * `use_identity_as_username`: with that option mosquitto never calls the
 * MOSQ_EVT_BASIC_AUTH callbacks (handle_connect.c 2.0.11 l.882-883), and then any
 * member could take over another member's session by using its client id.
 *
 * CONNECT (MOSQ_EVT_BASIC_AUTH) is accepted only if
 *   - the client presented a certificate (the TLS layer already verified it),
 *   - its subject has exactly one CN, without NUL, matching [a-z0-9][a-z0-9-]{0,62},
 *   - the MQTT username is absent (the plugin then sets it to the CN) or == CN,
 *   - the client id is CN, or CN + "." + [A-Za-z0-9_-]{1,64},
 *   - the CN is not listed in the revoked file,
 *   - for an enrollment CN (prefix "enroll-"): it has never been used before
 *     (one-shot; the use is recorded in the enroll-used file before accepting).
 * A refused CONNECT gets CONNACK 0x87 (MQTT 5) / 5 (MQTT 3.1.1) and never
 * reaches connect__on_authorised(), so the session of a victim whose client
 * id was claimed is not taken over.
 *
 * ACL (MOSQ_EVT_ACL_CHECK): enrollment identities may only publish to
 * <root><CN>/request and subscribe to / read <root><CN>/reply; everything else
 * is denied. For every other identity the plugin returns
 * MOSQ_ERR_PLUGIN_DEFER, so the broker's `acl_file` decides.
 *
 * Revocation (MOSQ_EVT_RELOAD, i.e. SIGHUP): the revoked and enroll-used
 * files are re-read; in the next MOSQ_EVT_TICK (same main-loop iteration, after
 * mosquitto has reloaded the ACLs) every connected client whose username is
 * revoked is kicked with its will (MQTT 5 clients get DISCONNECT 0x98
 * "administrative action"). TICK callbacks run only with
 * `per_listener_settings false` (plugin.c 2.0.11 l.186).
 * Right after the RELOAD callbacks mosquitto re-runs BASIC_AUTH for every
 * session it knows (security_default.c mosquitto_security_apply_default, 2.0.11
 * l.1254), including offline persistent sessions that have no TLS object any
 * more. The plugin recognises that pass (flag set in RELOAD, cleared in the next
 * MOSQ_EVT_TICK, which loop.c runs after the reload block) and then judges
 * sessions without a certificate by username/client id only, so offline
 * sessions of good nodes (and their queued messages) survive a SIGHUP.
 */
#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/asn1.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_NAME 63
#define MAX_SUFFIX 64

struct used_entry {
	char *cn;
	long not_after;             /* epoch seconds of the enrollment cert's notAfter */
	const struct mosquitto *client; /* live session that consumed it, or NULL */
};

struct state {
	mosquitto_plugin_id_t *pid;
	char *revoked_file;
	char *used_file;
	char *enroll_prefix;
	char *topic_root;
	char **revoked;             /* sorted, for bsearch */
	size_t revoked_count;
	struct used_entry *used;
	size_t used_count;
	bool reloading;             /* true between MOSQ_EVT_RELOAD and the next tick */
	bool kick_pending;          /* kick revoked clients in the next tick */
	time_t reload_time;
};

static struct state st;

/* ---------------------------------------------------------------- helpers */

static bool valid_name(const char *s, size_t len)
{
	size_t i;
	if(len < 1 || len > MAX_NAME) return false;
	if(!(islower((unsigned char)s[0]) || isdigit((unsigned char)s[0]))) return false;
	for(i=1; i<len; i++){
		unsigned char c = (unsigned char)s[i];
		if(!(islower(c) || isdigit(c) || c == '-')) return false;
	}
	return true;
}

static bool valid_suffix(const char *s)
{
	size_t i, len = strlen(s);
	if(len < 1 || len > MAX_SUFFIX) return false;
	for(i=0; i<len; i++){
		unsigned char c = (unsigned char)s[i];
		if(!(isalnum(c) || c == '-' || c == '_')) return false;
	}
	return true;
}

/* client id must be "<cn>" or "<cn>.<suffix>" */
static bool clientid_bound(const char *id, const char *cn)
{
	size_t n = strlen(cn);
	if(!id) return false;
	if(strncmp(id, cn, n)) return false;
	if(id[n] == '\0') return true;
	if(id[n] != '.') return false;
	return valid_suffix(id + n + 1);
}

static bool is_enroll(const char *cn)
{
	return strncmp(cn, st.enroll_prefix, strlen(st.enroll_prefix)) == 0;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char * const *)a, *(char * const *)b);
}

static bool is_revoked(const char *cn)
{
	if(!st.revoked_count) return false;
	return bsearch(&cn, st.revoked, st.revoked_count, sizeof(char *), cmp_str) != NULL;
}

static struct used_entry *find_used(const char *cn)
{
	size_t i;
	for(i=0; i<st.used_count; i++){
		if(!strcmp(st.used[i].cn, cn)) return &st.used[i];
	}
	return NULL;
}

static void free_revoked(void)
{
	size_t i;
	for(i=0; i<st.revoked_count; i++) free(st.revoked[i]);
	free(st.revoked);
	st.revoked = NULL;
	st.revoked_count = 0;
}

static char *trim(char *line)
{
	char *end;
	while(*line && isspace((unsigned char)*line)) line++;
	end = line + strlen(line);
	while(end > line && isspace((unsigned char)end[-1])) *--end = '\0';
	return line;
}

/* One CN per line; '#' starts a comment line. The file must exist (fail closed):
 * at start-up a missing/unreadable file stops the broker (plugin init fails); at a
 * reload the previous list is kept and an error is logged. Replace the file
 * atomically (write a temporary file, rename it over). */
static int load_revoked(void)
{
	FILE *f;
	char buf[512];
	char **list = NULL;
	size_t count = 0, cap = 0;

	f = fopen(st.revoked_file, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "ipdc_auth: cannot read revoked file %s: %s (keeping previous list)",
				st.revoked_file, strerror(errno));
		return MOSQ_ERR_UNKNOWN;
	}
	while(fgets(buf, sizeof(buf), f)){
		char *l = trim(buf);
		if(!*l || *l == '#') continue;
		if(count == cap){
			char **n;
			cap = cap ? cap*2 : 16;
			n = realloc(list, cap*sizeof(char *));
			if(!n){ fclose(f); goto oom; }
			list = n;
		}
		list[count] = strdup(l);
		if(!list[count]){ fclose(f); goto oom; }
		count++;
	}
	fclose(f);
	if(count) qsort(list, count, sizeof(char *), cmp_str);
	free_revoked();
	st.revoked = list;
	st.revoked_count = count;
	return MOSQ_ERR_SUCCESS;
oom:
	while(count) free(list[--count]);
	free(list);
	return MOSQ_ERR_NOMEM;
}

static int add_used(const char *cn, long not_after, const struct mosquitto *client)
{
	struct used_entry *n = realloc(st.used, (st.used_count+1)*sizeof(*n));
	if(!n) return MOSQ_ERR_NOMEM;
	st.used = n;
	st.used[st.used_count].cn = strdup(cn);
	if(!st.used[st.used_count].cn) return MOSQ_ERR_NOMEM;
	st.used[st.used_count].not_after = not_after;
	st.used[st.used_count].client = client;
	st.used_count++;
	return MOSQ_ERR_SUCCESS;
}

/* Lines "CN notAfter-epoch". Entries whose certificate has expired are
 * dropped from memory (the TLS layer refuses such certificates anyway). Live
 * consumers already in memory are kept. */
static int load_used(void)
{
	FILE *f;
	char buf[512];
	long now = (long)time(NULL);
	size_t i, j;

	/* forget expired entries that have no live session */
	for(i=0, j=0; i<st.used_count; i++){
		if(st.used[i].client == NULL && st.used[i].not_after < now){
			free(st.used[i].cn);
		}else{
			st.used[j++] = st.used[i];
		}
	}
	st.used_count = j;

	f = fopen(st.used_file, "r");
	if(!f){
		if(errno == ENOENT) return MOSQ_ERR_SUCCESS;
		mosquitto_log_printf(MOSQ_LOG_ERR, "ipdc_auth: cannot read enroll-used file %s: %s",
				st.used_file, strerror(errno));
		return MOSQ_ERR_UNKNOWN;
	}
	while(fgets(buf, sizeof(buf), f)){
		char cn[128];
		long na = 0;
		char *l = trim(buf);
		if(!*l || *l == '#') continue;
		if(sscanf(l, "%127s %ld", cn, &na) < 1) continue;
		if(na && na < now) continue;
		if(find_used(cn)) continue;
		if(add_used(cn, na ? na : now + 86400L*365, NULL)){ fclose(f); return MOSQ_ERR_NOMEM; }
	}
	fclose(f);
	return MOSQ_ERR_SUCCESS;
}

static int record_used(const char *cn, long not_after, const struct mosquitto *client)
{
	FILE *f = fopen(st.used_file, "a");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "ipdc_auth: cannot append to %s: %s", st.used_file, strerror(errno));
		return MOSQ_ERR_UNKNOWN;
	}
	if(fprintf(f, "%s %ld\n", cn, not_after) < 0 || fflush(f) || fsync(fileno(f))){
		fclose(f);
		return MOSQ_ERR_UNKNOWN;
	}
	if(fclose(f)) return MOSQ_ERR_UNKNOWN;
	return add_used(cn, not_after, client);
}

/* Copies the single CN of the client's certificate into cn; fills *not_after. */
static int cert_cn(const struct mosquitto *client, char *cn, size_t cnlen, long *not_after, bool *have_cert)
{
	X509 *cert;
	X509_NAME *name;
	X509_NAME_ENTRY *entry;
	ASN1_STRING *data;
	int idx, len;
	struct tm tm;
	const ASN1_TIME *na;

	*have_cert = false;
	cert = mosquitto_client_certificate(client); /* new reference (SSL_get_peer_certificate) */
	if(!cert) return MOSQ_ERR_AUTH;
	*have_cert = true;

	name = X509_get_subject_name(cert);
	idx = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
	if(idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0){
		X509_free(cert);
		return MOSQ_ERR_AUTH; /* no CN, or more than one */
	}
	entry = X509_NAME_get_entry(name, idx);
	data = entry ? X509_NAME_ENTRY_get_data(entry) : NULL;
	len = data ? ASN1_STRING_length(data) : -1;
	if(len < 1 || (size_t)len >= cnlen){
		X509_free(cert);
		return MOSQ_ERR_AUTH;
	}
	memcpy(cn, ASN1_STRING_get0_data(data), (size_t)len);
	cn[len] = '\0';
	if(strlen(cn) != (size_t)len || !valid_name(cn, (size_t)len)){
		X509_free(cert);
		return MOSQ_ERR_AUTH;
	}
	*not_after = 0;
	na = X509_get0_notAfter(cert);
	if(na && ASN1_TIME_to_tm(na, &tm) == 1){
		*not_after = (long)timegm(&tm);
	}
	X509_free(cert);
	return MOSQ_ERR_SUCCESS;
}

static int refuse(const struct mosquitto *client, const char *why, const char *cn)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "ipdc_auth: refused client id '%s' username '%s' cert CN '%s' from %s: %s",
			mosquitto_client_id(client) ? mosquitto_client_id(client) : "",
			mosquitto_client_username(client) ? mosquitto_client_username(client) : "",
			cn ? cn : "", mosquitto_client_address(client) ? mosquitto_client_address(client) : "?", why);
	return MOSQ_ERR_AUTH;
}

/* True only during the re-authentication pass that mosquitto runs right after
 * the RELOAD callbacks. The tick clears the flag; the time bound also closes it
 * where ticks do not run (per_listener_settings true: plugin.c 2.0.11 l.186). */
static bool in_reload_pass(void)
{
	return st.reloading && time(NULL) - st.reload_time <= 1;
}

/* -------------------------------------------------------------- callbacks */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const struct mosquitto *client = ed->client;
	const char *id = mosquitto_client_id(client);
	const char *user = ed->username;
	char cn[MAX_NAME+2];
	long not_after = 0;
	bool have_cert;
	struct used_entry *u;
	(void)event; (void)userdata;

	if(cert_cn(client, cn, sizeof(cn), &not_after, &have_cert) != MOSQ_ERR_SUCCESS){
		if(!have_cert && in_reload_pass() && user){
			/* SIGHUP re-check of a session without a TLS object: an offline
			 * persistent session. Its username was bound to its certificate
			 * when it connected; keep it unless it is revoked now. */
			if(!valid_name(user, strlen(user)) || !clientid_bound(id, user)) return refuse(client, "offline session not bound", user);
			if(is_revoked(user)) return refuse(client, "revoked (offline session)", user);
			if(is_enroll(user)) return refuse(client, "enrollment sessions do not persist", user);
			return MOSQ_ERR_SUCCESS;
		}
		return refuse(client, have_cert ? "certificate has no single valid CN" : "no client certificate", NULL);
	}
	if(user && strcmp(user, cn)) return refuse(client, "username != certificate CN", cn);
	if(!clientid_bound(id, cn)) return refuse(client, "client id not <CN> or <CN>.<suffix>", cn);
	if(is_revoked(cn)){
		if(in_reload_pass() && st.kick_pending){
			/* A live connection of a node revoked by this reload: let the re-check
			 * pass keep it for the rest of this loop iteration; on_tick kicks it
			 * with its will once the ACLs are loaded again. */
			return MOSQ_ERR_SUCCESS;
		}
		return refuse(client, "revoked", cn);
	}

	if(is_enroll(cn)){
		u = find_used(cn);
		if(u){
			if(!(in_reload_pass() && u->client == client)){
				return refuse(client, "enrollment certificate already used", cn);
			}
		}else if(record_used(cn, not_after, client) != MOSQ_ERR_SUCCESS){
			return refuse(client, "cannot record enrollment use", cn);
		}
	}
	if(!user){
		if(mosquitto_set_username((struct mosquitto *)client, cn) != MOSQ_ERR_SUCCESS){
			return refuse(client, "cannot set username", cn);
		}
	}
	return MOSQ_ERR_SUCCESS;
}

static bool topic_is(const char *topic, const char *cn, const char *leaf)
{
	size_t r = strlen(st.topic_root), c = strlen(cn);
	return !strncmp(topic, st.topic_root, r)
		&& !strncmp(topic + r, cn, c)
		&& topic[r+c] == '/'
		&& !strcmp(topic + r + c + 1, leaf);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user = mosquitto_client_username(ed->client);
	(void)event; (void)userdata;

	if(!user || !is_enroll(user)) return MOSQ_ERR_PLUGIN_DEFER; /* acl_file decides */

	switch(ed->access){
		case MOSQ_ACL_WRITE:
			return topic_is(ed->topic, user, "request") ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_READ:
		case MOSQ_ACL_SUBSCRIBE:
			return topic_is(ed->topic, user, "reply") ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_UNSUBSCRIBE:
			return MOSQ_ERR_SUCCESS;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event; (void)event_data; (void)userdata;

	load_revoked();
	load_used();
	st.reloading = true;
	st.kick_pending = true;
	st.reload_time = time(NULL);
	/* The kick is NOT done here: during MOSQ_EVT_RELOAD mosquitto has already freed
	 * the acl_file data (mosquitto_security_cleanup runs before
	 * mosquitto_security_init, loop.c 2.0.11 l.236-238), so a will published
	 * now would be denied by the ACL. on_tick kicks. */
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "ipdc_auth: reloaded, %zu revoked, %zu enrollment identities used",
			st.revoked_count, st.used_count);
	/* DEFER so that other plugins' reload callbacks also run (security.c 2.0.11 l.470-479). */
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	size_t i;
	(void)event; (void)event_data; (void)userdata;
	st.reloading = false;
	if(st.kick_pending){
		st.kick_pending = false;
		/* with_will = true: the node's last will (IPDC: clears its retained presence)
		 * is published; MQTT 5 clients get DISCONNECT 0x98 first. */
		for(i=0; i<st.revoked_count; i++){
			mosquitto_kick_client_by_username(st.revoked[i], true);
		}
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	size_t i;
	(void)event; (void)userdata;
	for(i=0; i<st.used_count; i++){
		if(st.used[i].client == ed->client) st.used[i].client = NULL;
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------- plugin API */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i=0; i<supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data, struct mosquitto_opt *opts, int opt_count)
{
	int i, rc;

	memset(&st, 0, sizeof(st));
	st.pid = identifier;
	for(i=0; i<opt_count; i++){
		if(!strcmp(opts[i].key, "revoked_file")) st.revoked_file = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "enroll_used_file")) st.used_file = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "enroll_prefix")) st.enroll_prefix = strdup(opts[i].value);
		else if(!strcmp(opts[i].key, "enroll_topic_root")) st.topic_root = strdup(opts[i].value);
	}
	if(!st.revoked_file || !st.used_file){
		mosquitto_log_printf(MOSQ_LOG_ERR, "ipdc_auth: plugin_opt_revoked_file and plugin_opt_enroll_used_file are required");
		return MOSQ_ERR_INVAL;
	}
	if(!st.enroll_prefix) st.enroll_prefix = strdup("enroll-");
	if(!st.topic_root) st.topic_root = strdup("ipdc/enroll/");
	if(!st.enroll_prefix || !st.topic_root) return MOSQ_ERR_NOMEM;

	if((rc = load_revoked()) != MOSQ_ERR_SUCCESS) return rc;
	if((rc = load_used()) != MOSQ_ERR_SUCCESS) return rc;

	if((rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, NULL))) return rc;
	if((rc = mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL))) return rc;

	*user_data = &st;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "ipdc_auth: loaded, %zu revoked, %zu enrollment identities used",
			st.revoked_count, st.used_count);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *opts, int opt_count)
{
	size_t i;
	(void)user_data; (void)opts; (void)opt_count;

	mosquitto_callback_unregister(st.pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(st.pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(st.pid, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(st.pid, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(st.pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	free_revoked();
	for(i=0; i<st.used_count; i++) free(st.used[i].cn);
	free(st.used);
	free(st.revoked_file);
	free(st.used_file);
	free(st.enroll_prefix);
	free(st.topic_root);
	memset(&st, 0, sizeof(st));
	return MOSQ_ERR_SUCCESS;
}
