/*
 * pcocc SPANK plugin: the --vm option of srun, salloc and sbatch.
 *
 * For an srun step with --vm, in slurmstepd as root, on each node of the step,
 * before the tasks start (init_post_opt, once per node and step):
 *     pcocc internal setup create --jobid J --uid U --tasks-on-node T
 *   with SLURM_STEP_NODELIST (the step's nodes), PCOCC_LOCAL_RANKS (the global
 *   ids of this node's tasks, i.e. its VM ranks, comma-separated) and
 *   PCOCC_TASK_<VAR> (the tasks' PCOCC_RUN_DIR, XDG_RUNTIME_DIR, TMPDIR and
 *   HOME, from which pcocc finds the VMs' run directory) in its environment.
 *   If it fails, every task fails and srun prints the command's message; its
 *   teardown (below) then runs at once, before any task starts, with
 *   `--failed MESSAGE`: the node is recorded failed, even when the create was
 *   killed before it could say so, so the job's other nodes and its launcher
 *   stop waiting for it.
 *   A marker <statedir>/spank-J.vm is written before the create runs.
 *
 * Teardown, in the job epilog (slurm_spank_job_epilog: slurmd runs it as root
 * on every node of the job once all its steps are gone, so no step's kill
 * reaches it), on each node that has the job's marker or whose job asked for
 * --vm at allocation time:
 *     pcocc internal setup delete --jobid J --uid U --deadline D
 *   which undoes what create recorded, removes the VMs' run directories, and
 *   stops by itself after D seconds, logging what is left (the next setup on
 *   the node, or `pcocc internal setup cleanup`, removes it). The step's own
 *   end does not tear down: slurmstepd's processes are signalled then killed
 *   there (KillWait), and a teardown cut half-way leaves objects behind.
 *
 * When a VM task ends killed by a signal, or with a status other than 0 (the VM
 * stopped) and 1 (it failed and said why), slurmstepd's task_exit hook runs, as root:
 *     pcocc internal setup task-exit --jobid J --uid U --rank R --status S
 *   (S: the task's wait status) which marks VM R failed with the reason, unless it
 *   already said how it ended: nothing else sees a task SIGKILLed or crashed (the
 *   launcher only sees srun, which goes on with the other tasks).
 *
 * The commands' environment is slurmd's (OVS_RUNDIR, PATH...: in the epilog,
 * read from slurmd's /proc/PID/environ, as slurmd gives its epilogs a
 * minimal environment) plus SLURM_JOB_ID, SLURM_STEP_ID and SLURM_JOB_UID.
 * Batch, interactive and extern steps are left alone.
 *
 * plugstack.conf:
 *   required /path/spank_pcocc.so pcocc=/usr/bin/pcocc [timeout=SECONDS]
 *            [teardown_timeout=SECONDS] [statedir=PATH]
 *   timeout (default 300) bounds `setup create`; teardown_timeout (default
 *   120) bounds `setup delete` (pcocc stops itself 10 s before, the plugin
 *   kills it at the bound). slurm.conf's PrologEpilogTimeout must exceed
 *   teardown_timeout, or slurmd kills the epilog and drains the node
 *   (slurm.conf(5), PrologEpilogTimeout). statedir (default
 *   $PCOCC_NODE_STATE_DIR, else /var/run/pcocc) must be pcocc's node state dir.
 *
 * Build: gcc -shared -fPIC -o spank_pcocc.so spank_pcocc.c (Debian: libslurm-dev)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(pcocc, 1);

#define MSG_MAX 2048
#define DEFAULT_STATEDIR "/var/run/pcocc"
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
/* the option as the job's prolog/epilog environment carries it (SPANK_ + _SLURM_SPANK_OPTION_<plugin>_<option>) */
#define VM_OPTION_ENV "SPANK__SLURM_SPANK_OPTION_pcocc_vm"
/* pcocc stops its own teardown this long before the plugin's bound, to log what is left */
#define DEADLINE_MARGIN 10
/* seconds `setup task-exit` may take (one store update; slurmstepd waits for it) */
#define TASK_EXIT_TIMEOUT 30

static int vm_flag;             /* --vm was given (set by the option callback) */
static char setup_error[MSG_MAX]; /* why setup create failed, for the tasks' stderr */
static char pcocc_bin[PATH_MAX] = "pcocc";
static char statedir[PATH_MAX] = "";
static int timeout_s = 300;
static int teardown_timeout_s = 120;

static int opt_vm(int val, const char *optarg, int remote)
{
	vm_flag = 1;
	return 0;
}

struct spank_option spank_options[] = {
	{ "vm", NULL, "Run the step's tasks as pcocc VMs (sets up the nodes for them)",
	  0, 0, (spank_opt_cb_f) opt_vm },
	SPANK_OPTIONS_TABLE_END
};

static int seconds_arg(const char *arg, const char *value, int *out)
{
	char *end;
	long v = strtol(value, &end, 10);

	if (!*value || *end || v <= 0 || v > 86400) {
		slurm_error("pcocc: bad plugin argument %s (want a number of seconds, 1 to 86400)", arg);
		return -1;
	}
	*out = (int) v;
	return 0;
}

static int parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (!strncmp(av[i], "pcocc=", 6)) {
			snprintf(pcocc_bin, sizeof pcocc_bin, "%s", av[i] + 6);
		} else if (!strncmp(av[i], "timeout=", 8)) {
			if (seconds_arg(av[i], av[i] + 8, &timeout_s) < 0)
				return -1;
		} else if (!strncmp(av[i], "teardown_timeout=", 17)) {
			if (seconds_arg(av[i], av[i] + 17, &teardown_timeout_s) < 0)
				return -1;
		} else if (!strncmp(av[i], "statedir=", 9) && av[i][9] == '/') {
			snprintf(statedir, sizeof statedir, "%s", av[i] + 9);
		} else {
			slurm_error("pcocc: unknown plugin argument %s (known: pcocc=PATH timeout=SECONDS "
				    "teardown_timeout=SECONDS statedir=/PATH)", av[i]);
			return -1;
		}
	}
	return 0;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/*
 * The environment the commands start from. In slurmstepd (steps), ours: slurmd
 * passed its own on. In the job epilog, slurmd gives us a minimal one (no PATH,
 * none of its own variables): read slurmd's, our parent's, from /proc. The
 * returned array and strings live until the process ends (a few KB, once).
 */
static char **base_environ(void)
{
	extern char **environ;
	static char **cached;
	char path[64], comm[32] = "", *buf = NULL;
	size_t len = 0, cap = 0, n = 0;
	int fd;
	ssize_t r;

	if (spank_context() != S_CTX_JOB_SCRIPT)
		return environ;
	if (cached)
		return cached;
	snprintf(path, sizeof path, "/proc/%d/comm", (int) getppid());
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) >= 0) {
		r = read(fd, comm, sizeof comm - 1);
		comm[r > 0 ? r : 0] = '\0';
		close(fd);
	}
	if (strncmp(comm, "slurmd", 6) != 0) {
		slurm_info("pcocc: the epilog's parent is not slurmd (%s): using the epilog's environment", comm);
		return environ;
	}
	snprintf(path, sizeof path, "/proc/%d/environ", (int) getppid());
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return environ;
	for (;;) {
		if (len + 4096 + 1 > cap) {
			char *bigger = realloc(buf, cap = len + 65536);
			if (!bigger) {
				free(buf);
				close(fd);
				return environ;
			}
			buf = bigger;
		}
		r = read(fd, buf + len, 4096);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		len += r;
	}
	close(fd);
	buf[len] = '\0';
	for (size_t i = 0; i < len; i += strlen(buf + i) + 1)
		n++;
	if (!(cached = calloc(n + 2, sizeof *cached))) {
		free(buf);
		return environ;
	}
	n = 0;
	for (size_t i = 0; i < len; i += strlen(buf + i) + 1)
		if (strchr(buf + i, '='))
			cached[n++] = buf + i;
	for (size_t i = 0; i < n; i++)
		if (!strncmp(cached[i], "PATH=", 5))
			return cached;
	cached[n] = DEFAULT_PATH;
	return cached;
}

/*
 * The base environment plus the step's ids and the caller's extra "K=V"
 * strings (not copied); built before fork (no malloc in the child).
 */
static char **step_env(uint32_t job, uint32_t step, uint32_t uid, char **extra)
{
	char **base = base_environ();
	static const char *const ours[] = { "SLURM_JOB_ID=", "SLURM_STEP_ID=", "SLURM_JOB_UID=",
					    "SLURM_STEP_NODELIST=", "PCOCC_LOCAL_RANKS=", "PCOCC_TASK_", NULL };
	size_t n = 0, nextra = 0, k = 0;
	char **env;

	while (base[n])
		n++;
	while (extra && extra[nextra])
		nextra++;
	env = calloc(n + 3 + nextra + 1, sizeof *env);
	if (!env)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		int keep = 1;
		for (const char *const *o = ours; *o; o++)
			if (!strncmp(base[i], *o, strlen(*o)))
				keep = 0;
		if (keep)
			env[k++] = base[i];
	}
	/* no step in the epilog (NO_VAL): an empty SLURM_STEP_ID */
	if (asprintf(&env[k++], "SLURM_JOB_ID=%u", job) < 0
	    || (step == NO_VAL ? asprintf(&env[k++], "SLURM_STEP_ID=") : asprintf(&env[k++], "SLURM_STEP_ID=%u", step)) < 0
	    || asprintf(&env[k++], "SLURM_JOB_UID=%u", uid) < 0) {
		free(env);  /* a few bytes may leak on this unlikely path */
		return NULL;
	}
	for (size_t i = 0; i < nextra; i++)
		env[k++] = extra[i];
	return env;
}

static void free_env(char **env, char **extra)
{
	size_t n = 0, nextra = 0;

	while (env[n])
		n++;
	while (extra && extra[nextra])
		nextra++;
	for (size_t i = n - nextra - 3; i < n - nextra; i++)  /* the three we made */
		free(env[i]);
	free(env);
}

/* In the child: a clean process for pcocc, not slurmstepd's signal state or fds. */
static void exec_child(int out, char *const argv[], char **env)
{
	static const char failed[] = "cannot execute ", hint[] = " (see pcocc=PATH in plugstack.conf)\n";
	sigset_t none;
	int devnull = open("/dev/null", O_RDONLY);

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL);
	if (devnull >= 0)
		dup2(devnull, 0);
	dup2(out, 1);
	dup2(out, 2);
	closefrom(3);
	setsid();  /* so that a timeout can kill the whole tree */
	execvpe(argv[0], argv, env);
	/* write(2) only: the parent may have had other threads, so no stdio here */
	if (write(2, failed, sizeof failed - 1) < 0 || write(2, argv[0], strlen(argv[0])) < 0
	    || write(2, hint, sizeof hint - 1) < 0)
		_exit(126);
	_exit(127);
}

/* Drop trailing blank space and join lines with "; ": one log line, one stderr line. */
static void one_line(char *msg, size_t msglen)
{
	char out[MSG_MAX] = "";
	size_t n = strlen(msg), len = 0;

	while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' ' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	for (char *p = msg; *p && len + 3 < sizeof out; p++) {
		if (*p == '\n') {
			out[len++] = ';';
			out[len++] = ' ';
		} else {
			out[len++] = *p;
		}
	}
	out[len] = '\0';
	snprintf(msg, msglen, "%s", out);
}

/*
 * Run argv for at most limit seconds, collecting its output (the tail, if long)
 * in msg. Returns its exit status, or -1 if it could not run or ran out of time
 * (then it is killed, with its whole session).
 */
static int run(char *const argv[], uint32_t job, uint32_t step, uint32_t uid, char **extra, int limit,
	       char *msg, size_t msglen)
{
	int fds[2], status = 0, reaped = 0;
	size_t len = 0;
	char **env;
	double deadline = now() + limit;
	pid_t pid;

	msg[0] = '\0';
	if (!(env = step_env(job, step, uid, extra))) {
		snprintf(msg, msglen, "out of memory");
		return -1;
	}
	if (pipe2(fds, O_CLOEXEC) < 0) {
		snprintf(msg, msglen, "pipe: %s", strerror(errno));
		free_env(env, extra);
		return -1;
	}
	pid = fork();
	if (pid < 0) {
		snprintf(msg, msglen, "fork: %s", strerror(errno));
		close(fds[0]);
		close(fds[1]);
		free_env(env, extra);
		return -1;
	}
	if (pid == 0)
		exec_child(fds[1], argv, env);
	close(fds[1]);
	free_env(env, extra);
	for (;;) {
		struct pollfd pfd = { .fd = fds[0], .events = POLLIN };
		int left = (int) ((deadline - now()) * 1000);
		char chunk[512];
		ssize_t n;

		if (!reaped && waitpid(pid, &status, WNOHANG) == pid) {
			/* it is done; a stray of its session may still hold the pipe: read what is there, then end them */
			reaped = 1;
			kill(-pid, SIGKILL);
			deadline = now();
			left = 0;
		}
		if (left <= 0 && !reaped) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			close(fds[0]);
			one_line(msg, msglen);
			snprintf(msg + strlen(msg), msglen - strlen(msg), "%stimed out after %d s (killed)",
				 msg[0] ? "; " : "", limit);
			return -1;
		}
		/* wake up every second: the command may end while a stray keeps the pipe open */
		if (poll(&pfd, 1, reaped ? 0 : (left < 1000 ? left : 1000)) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (!pfd.revents) {
			if (reaped)
				break;
			continue;
		}
		n = read(fds[0], chunk, sizeof chunk);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		/* keep the tail: the last lines say why it failed */
		if (len + n >= msglen) {
			size_t drop = len + n - (msglen - 1);
			if (drop > len)
				drop = len;
			memmove(msg, msg + drop, len - drop);
			len -= drop;
			if ((size_t) n > msglen - 1 - len)
				n = msglen - 1 - len;
		}
		memcpy(msg + len, chunk, n);
		len += n;
		msg[len] = '\0';
	}
	close(fds[0]);
	while (!reaped && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	one_line(msg, msglen);
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	snprintf(msg + strlen(msg), msglen - strlen(msg), "%skilled by signal %d",
		 msg[0] ? "; " : "", WTERMSIG(status));
	return -1;
}

/* The ids of this step and its number of tasks on this node; -1 (logged) if unreadable. */
static int step_ids(spank_t sp, uint32_t *job, uint32_t *step, uint32_t *uid, uint32_t *tasks)
{
	uid_t u;

	if (spank_get_item(sp, S_JOB_ID, job) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_STEPID, step) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_UID, &u) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, tasks) != ESPANK_SUCCESS) {
		slurm_error("pcocc: cannot read the step's job id, step id, uid or task count");
		return -1;
	}
	*uid = u;
	return 0;
}

static int vm_requested(spank_t sp)
{
	return vm_flag || spank_option_getopt(sp, &spank_options[0], NULL) == ESPANK_SUCCESS;
}

/* pcocc's node state dir, as pcocc resolves it: statedir=, else $PCOCC_NODE_STATE_DIR (slurmd's), else the default. */
static const char *state_dir(void)
{
	static char resolved[PATH_MAX];
	char **env;

	if (statedir[0])
		return statedir;
	if (!resolved[0]) {
		snprintf(resolved, sizeof resolved, "%s", DEFAULT_STATEDIR);
		for (env = base_environ(); *env; env++)
			if (!strncmp(*env, "PCOCC_NODE_STATE_DIR=", 21) && (*env)[21] == '/')
				snprintf(resolved, sizeof resolved, "%s", *env + 21);
	}
	return resolved;
}

static void marker_path(uint32_t job, char *path, size_t len)
{
	snprintf(path, len, "%s/spank-%u.vm", state_dir(), job);
}

/* Mark the job as set up on this node (before its setup runs): the epilog then tears it down. */
static void mark_job(uint32_t job, uint32_t uid)
{
	char path[PATH_MAX + 32], text[16];
	int fd, n;

	if (mkdir(state_dir(), 0755) < 0 && errno != EEXIST)
		slurm_error("pcocc: cannot make %s: %s", state_dir(), strerror(errno));
	marker_path(job, path, sizeof path);
	fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		slurm_error("pcocc: cannot write %s: %s (the job's teardown depends on --vm at allocation)",
			    path, strerror(errno));
		return;
	}
	n = snprintf(text, sizeof text, "%u\n", uid);
	if (write(fd, text, n) != n)
		slurm_error("pcocc: cannot write %s: %s", path, strerror(errno));
	close(fd);
}

/* Whether this node has the job's marker (a regular file, not a link someone planted). */
static int job_marked(uint32_t job)
{
	char path[PATH_MAX + 32];
	struct stat st;

	marker_path(job, path, sizeof path);
	return lstat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == 0;
}

static void unmark_job(uint32_t job)
{
	char path[PATH_MAX + 32];

	marker_path(job, path, sizeof path);
	if (unlink(path) < 0 && errno != ENOENT)
		slurm_error("pcocc: cannot remove %s: %s", path, strerror(errno));
}

/*
 * `pcocc internal setup delete` for the job on this node, bounded by
 * teardown_timeout; logs what failed or is left. Returns its status (0: done).
 */
static int teardown(uint32_t job, uint32_t step, uint32_t uid, const char *why, const char *failure)
{
	char sjob[16], suid[16], sdeadline[16], msg[MSG_MAX];
	int rc, deadline = teardown_timeout_s > 2 * DEADLINE_MARGIN ? teardown_timeout_s - DEADLINE_MARGIN
								    : (teardown_timeout_s + 1) / 2;
	double started = now();

	snprintf(sjob, sizeof sjob, "%u", job);
	snprintf(suid, sizeof suid, "%u", uid);
	snprintf(sdeadline, sizeof sdeadline, "%d", deadline);
	/* after a failed create, the node is then recorded failed with why: the other nodes and
	   the launcher stop waiting for it (a create killed by a signal could not say so itself) */
	char *argv[] = { pcocc_bin, "internal", "setup", "delete", "--jobid", sjob, "--uid", suid,
			 "--deadline", sdeadline, failure ? "--failed" : NULL, (char *) failure, NULL };

	slurm_info("pcocc: job %u (%s): %s internal setup delete --jobid %s --uid %s --deadline %s",
		   job, why, pcocc_bin, sjob, suid, sdeadline);
	rc = run(argv, job, step, uid, NULL, teardown_timeout_s, msg, sizeof msg);
	if (rc != 0)
		slurm_error("pcocc: node cleanup failed for job %u (status %d): %s; what is left stays in the node's "
			    "undo log, for the next setup on this node or `pcocc internal setup cleanup`",
			    job, rc, msg[0] ? msg : "no message");
	else
		slurm_info("pcocc: job %u: node cleanup done in %.1f s", job, now() - started);
	return rc;
}

/* The plugin's arguments, read once (every hook gets them; the epilog's process runs no slurm_spank_init). */
static int configure(int ac, char **av)
{
	static int done, rc;

	if (!done) {
		done = 1;
		rc = parse_args(ac, av);
	}
	return rc;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (configure(ac, av) < 0)
		return -1;
	/* salloc/sbatch do not load the static option table: register --vm by hand */
	if (spank_context() == S_CTX_ALLOCATOR
	    && spank_option_register(sp, &spank_options[0]) != ESPANK_SUCCESS) {
		slurm_error("pcocc: cannot register the --vm option");
		return -1;
	}
	return 0;
}

/* The tasks' variables that say where pcocc puts their VMs' run directory. */
static const char *const task_vars[] = { "PCOCC_RUN_DIR", "XDG_RUNTIME_DIR", "TMPDIR", "HOME", NULL };

/* slurmstepd, as root, once per step and node, before any task starts. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	uint32_t job, step, uid, tasks;
	char sjob[16], suid[16], stasks[16], msg[MSG_MAX];
	int rc;

	if (spank_context() != S_CTX_REMOTE || !vm_requested(sp))
		return 0;
	if (configure(ac, av) < 0)
		return -1;
	if (step_ids(sp, &job, &step, &uid, &tasks) < 0)
		return -1;
	/* only srun steps: the batch script and extern steps host no VM */
	if (step == SLURM_BATCH_SCRIPT || step == SLURM_EXTERN_CONT || step == SLURM_INTERACTIVE_STEP)
		return 0;
	snprintf(sjob, sizeof sjob, "%u", job);
	snprintf(suid, sizeof suid, "%u", uid);
	snprintf(stasks, sizeof stasks, "%u", tasks);
	char *argv[] = { pcocc_bin, "internal", "setup", "create", "--jobid", sjob,
			 "--uid", suid, "--tasks-on-node", stasks, NULL };
	/* what node setup cannot ask slurmctld cheaply: the step's nodes, the ranks of our tasks, where they keep files */
	static char nodelist[4096 + 32], ranks[MSG_MAX * 4], tvars[4][PATH_MAX + 32];
	char *extra[3 + 4] = { NULL }, **more = extra;
	size_t len = snprintf(ranks, sizeof ranks, "PCOCC_LOCAL_RANKS=");

	strcpy(nodelist, "SLURM_STEP_NODELIST=");
	if (spank_getenv(sp, "SLURM_STEP_NODELIST", nodelist + strlen(nodelist), sizeof nodelist - strlen(nodelist)) == ESPANK_SUCCESS)
		*more++ = nodelist;
	for (uint32_t i = 0; i < tasks; i++) {
		uint32_t gid;
		if (spank_get_item(sp, S_JOB_LOCAL_TO_GLOBAL_ID, i, &gid) != ESPANK_SUCCESS || len + 12 >= sizeof ranks)
			break;
		len += snprintf(ranks + len, sizeof ranks - len, "%s%u", i ? "," : "", gid);
		if (i + 1 == tasks)
			*more++ = ranks;
	}
	for (int i = 0; task_vars[i]; i++) {
		int n = snprintf(tvars[i], sizeof tvars[i], "PCOCC_TASK_%s=", task_vars[i]);
		if (spank_getenv(sp, task_vars[i], tvars[i] + n, sizeof tvars[i] - n) == ESPANK_SUCCESS)
			*more++ = tvars[i];
	}

	slurm_info("pcocc: job %u step %u: %s internal setup create --jobid %s --uid %s --tasks-on-node %s",
		   job, step, pcocc_bin, sjob, suid, stasks);
	mark_job(job, uid);  /* even a failed create may have left something to undo */
	rc = run(argv, job, step, uid, extra, timeout_s, msg, sizeof msg);
	if (rc != 0) {
		snprintf(setup_error, sizeof setup_error, "%s", msg[0] ? msg : "no message");
		slurm_error("pcocc: node setup failed for job %u (status %d): %s", job, rc, setup_error);
		/* no task will start: undo now, while nothing kills us (the epilog does it again if this fails) */
		if (teardown(job, step, uid, "failed start", setup_error) == 0)
			unmark_job(job);
	}
	/*
	 * Failing here would make srun print only "Plugin initialization failed"
	 * and exit 0: fail the tasks instead.
	 */
	return 0;
}

/* In each task's process, as root, with its stderr going to srun. */
int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	char host[256] = "";
	int task = 0;

	if (!setup_error[0])
		return 0;
	/* one message per node is enough; every task still fails */
	if (spank_get_item(sp, S_TASK_ID, &task) != ESPANK_SUCCESS || task == 0) {
		gethostname(host, sizeof host);
		fprintf(stderr, "pcocc: node setup failed on %s: %s\n", host, setup_error);
		fflush(stderr);
	}
	return -1;
}

/*
 * In slurmstepd, as root, as each task's exit status is collected. A task that said
 * how its VM ended exits 0 or 1; anything else (a signal, a crash) is told to pcocc.
 */
int slurm_spank_task_exit(spank_t sp, int ac, char **av)
{
	uint32_t job, step, uid, tasks, rank;
	int status = 0, rc;
	char sjob[16], suid[16], srank[16], sstatus[16], msg[MSG_MAX];

	if (spank_context() != S_CTX_REMOTE || !vm_requested(sp) || setup_error[0])
		return 0;
	if (configure(ac, av) < 0 || step_ids(sp, &job, &step, &uid, &tasks) < 0)
		return 0;
	if (step == SLURM_BATCH_SCRIPT || step == SLURM_EXTERN_CONT || step == SLURM_INTERACTIVE_STEP)
		return 0;
	if (spank_get_item(sp, S_TASK_EXIT_STATUS, &status) != ESPANK_SUCCESS
	    || spank_get_item(sp, S_TASK_GLOBAL_ID, &rank) != ESPANK_SUCCESS) {
		slurm_error("pcocc: job %u: cannot read a task's exit status or rank", job);
		return 0;
	}
	if (WIFEXITED(status) && (WEXITSTATUS(status) == 0 || WEXITSTATUS(status) == 1))
		return 0;
	snprintf(sjob, sizeof sjob, "%u", job);
	snprintf(suid, sizeof suid, "%u", uid);
	snprintf(srank, sizeof srank, "%u", rank);
	snprintf(sstatus, sizeof sstatus, "%d", status);
	char *argv[] = { pcocc_bin, "internal", "setup", "task-exit", "--jobid", sjob, "--uid", suid,
			 "--rank", srank, "--status", sstatus, NULL };
	rc = run(argv, job, step, uid, NULL, TASK_EXIT_TIMEOUT, msg, sizeof msg);
	if (rc != 0)
		slurm_error("pcocc: job %u: could not mark vm%u failed (status %d): %s", job, rank, rc, msg[0] ? msg : "no message");
	return 0;
}

/*
 * The job epilog: slurmd runs it as root on every node of the job after all
 * its steps are gone (slurm.conf(5): "the Epilog ... always runs on every node
 * of an allocation when the allocation is released"), under PrologEpilogTimeout.
 */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	uint32_t job = 0, uid = 0;
	uid_t u;
	const char *s;
	int marked, asked;

	if (configure(ac, av) < 0)
		return 0;  /* logged; failing would drain the node */
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS) {
		if (!(s = getenv("SLURM_JOB_ID")) || !(job = strtoul(s, NULL, 10))) {
			slurm_error("pcocc: epilog: no job id");
			return 0;
		}
	}
	if (spank_get_item(sp, S_JOB_UID, &u) == ESPANK_SUCCESS)
		uid = u;
	else if ((s = getenv("SLURM_JOB_UID")))
		uid = strtoul(s, NULL, 10);
	else {
		slurm_error("pcocc: epilog of job %u: no uid", job);
		return 0;
	}
	marked = job_marked(job);
	asked = getenv(VM_OPTION_ENV) != NULL || spank_option_getopt(sp, &spank_options[0], NULL) == ESPANK_SUCCESS;
	if (!marked && !asked)
		return 0;
	teardown(job, NO_VAL, uid, "job epilog", NULL);
	/* what failed stays in the undo log, which the next setup and `setup cleanup` replay */
	unmark_job(job);
	/* never fail the epilog: slurmd would drain the node for what pcocc's logs already name */
	return 0;
}
