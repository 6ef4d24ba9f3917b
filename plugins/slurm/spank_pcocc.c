/*
 * pcocc SPANK plugin: the --vm option of srun, salloc and sbatch.
 *
 * For an srun step with --vm, in slurmstepd as root, on each node of the step:
 *   - before the tasks start (init_post_opt, once per node and step):
 *       pcocc internal setup create --jobid J --uid U --tasks-on-node T
 *     with SLURM_STEP_NODELIST (the step's nodes) and PCOCC_LOCAL_RANKS (the
 *     global ids of this node's tasks, i.e. its VM ranks, comma-separated) in
 *     its environment. If it fails, every task fails and srun prints the
 *     command's message.
 *   - after the last local task has exited (or at slurmstepd's end if none ran):
 *       pcocc internal setup delete --jobid J --uid U
 * The command's environment is slurmd's (OVS_RUNDIR, ...) plus SLURM_JOB_ID,
 * SLURM_STEP_ID and SLURM_JOB_UID. Batch and extern steps are left alone.
 *
 * plugstack.conf:
 *   required /path/spank_pcocc.so pcocc=/usr/bin/pcocc [timeout=SECONDS]
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
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(pcocc, 1);

#define MSG_MAX 2048

static int vm_flag;             /* --vm was given (set by the option callback) */
static int setup_started;       /* setup create ran here: delete must run at exit */
static char setup_error[MSG_MAX]; /* why setup create failed, for the tasks' stderr */
static uint32_t tasks_exited;   /* local tasks whose exit slurmstepd has collected */
static char pcocc_bin[PATH_MAX] = "pcocc";
static int timeout_s = 300;

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

static int parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (!strncmp(av[i], "pcocc=", 6)) {
			snprintf(pcocc_bin, sizeof pcocc_bin, "%s", av[i] + 6);
		} else if (!strncmp(av[i], "timeout=", 8)) {
			timeout_s = atoi(av[i] + 8);
			if (timeout_s <= 0) {
				slurm_error("pcocc: bad plugin argument %s (want a number of seconds)", av[i]);
				return -1;
			}
		} else {
			slurm_error("pcocc: unknown plugin argument %s (known: pcocc=PATH timeout=SECONDS)", av[i]);
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
 * slurmstepd's environment plus the step's ids and the caller's extra "K=V"
 * strings (not copied); built before fork (no malloc in the child).
 */
static char **step_env(uint32_t job, uint32_t step, uint32_t uid, char **extra)
{
	extern char **environ;
	static const char *const ours[] = { "SLURM_JOB_ID=", "SLURM_STEP_ID=", "SLURM_JOB_UID=",
					    "SLURM_STEP_NODELIST=", "PCOCC_LOCAL_RANKS=", NULL };
	size_t n = 0, nextra = 0, k = 0;
	char **env;

	while (environ[n])
		n++;
	while (extra && extra[nextra])
		nextra++;
	env = calloc(n + 3 + nextra + 1, sizeof *env);
	if (!env)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		int keep = 1;
		for (const char *const *o = ours; *o; o++)
			if (!strncmp(environ[i], *o, strlen(*o)))
				keep = 0;
		if (keep)
			env[k++] = environ[i];
	}
	if (asprintf(&env[k++], "SLURM_JOB_ID=%u", job) < 0 || asprintf(&env[k++], "SLURM_STEP_ID=%u", step) < 0
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
 * Run argv, collecting its output (the tail, if long) in msg.
 * Returns its exit status, or -1 if it could not run or ran out of time.
 */
static int run(char *const argv[], uint32_t job, uint32_t step, uint32_t uid, char **extra, char *msg, size_t msglen)
{
	int fds[2], status = 0;
	size_t len = 0;
	char **env;
	double deadline = now() + timeout_s;
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

		if (left <= 0) {
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
			waitpid(pid, &status, 0);
			close(fds[0]);
			snprintf(msg, msglen, "timed out after %d s", timeout_s);
			return -1;
		}
		if (poll(&pfd, 1, left) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (!pfd.revents)
			continue;
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
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
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

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	if (parse_args(ac, av) < 0)
		return -1;
	/* salloc/sbatch do not load the static option table: register --vm by hand */
	if (spank_context() == S_CTX_ALLOCATOR
	    && spank_option_register(sp, &spank_options[0]) != ESPANK_SUCCESS) {
		slurm_error("pcocc: cannot register the --vm option");
		return -1;
	}
	return 0;
}

/* slurmstepd, as root, once per step and node, before any task starts. */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	uint32_t job, step, uid, tasks;
	char sjob[16], suid[16], stasks[16], msg[MSG_MAX];
	int rc;

	if (spank_context() != S_CTX_REMOTE || !vm_requested(sp))
		return 0;
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
	/* what node setup cannot ask slurmctld cheaply: the step's nodes, the ranks of our tasks */
	static char nodelist[4096 + 32], ranks[MSG_MAX * 4];
	char *extra[3] = { NULL, NULL, NULL }, **more = extra;
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

	slurm_info("pcocc: job %u step %u: %s internal setup create --jobid %s --uid %s --tasks-on-node %s",
		   job, step, pcocc_bin, sjob, suid, stasks);
	setup_started = 1;  /* even a failed create may have left something to delete */
	rc = run(argv, job, step, uid, extra, msg, sizeof msg);
	if (rc != 0) {
		snprintf(setup_error, sizeof setup_error, "%s", msg[0] ? msg : "no message");
		slurm_error("pcocc: node setup failed for job %u (status %d): %s", job, rc, setup_error);
	}
	/*
	 * Failing here would make srun print only "Plugin initialization failed",
	 * exit 0, and skip slurm_spank_exit (so no cleanup): fail the tasks instead.
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

static void setup_delete(spank_t sp)
{
	uint32_t job, step, uid, tasks;
	char sjob[16], suid[16], msg[MSG_MAX];
	int rc;

	setup_started = 0;
	if (step_ids(sp, &job, &step, &uid, &tasks) < 0)
		return;
	snprintf(sjob, sizeof sjob, "%u", job);
	snprintf(suid, sizeof suid, "%u", uid);
	char *argv[] = { pcocc_bin, "internal", "setup", "delete", "--jobid", sjob, "--uid", suid, NULL };

	slurm_info("pcocc: job %u step %u: %s internal setup delete --jobid %s --uid %s", job, step, pcocc_bin, sjob, suid);
	rc = run(argv, job, step, uid, NULL, msg, sizeof msg);
	if (rc != 0)
		slurm_error("pcocc: node cleanup failed for job %u (status %d): %s", job, rc,
			    msg[0] ? msg : "no message");
}

/*
 * slurmstepd, as root, as each task's exit is collected. Clean up after the
 * last one, before slurmstepd reports it to srun: once srun is done, the end
 * of the job signals every process under slurmstepd, our cleanup included.
 */
int slurm_spank_task_exit(spank_t sp, int ac, char **av)
{
	uint32_t tasks = 0;

	if (spank_context() != S_CTX_REMOTE || !setup_started)
		return 0;
	if (spank_get_item(sp, S_JOB_LOCAL_TASK_COUNT, &tasks) == ESPANK_SUCCESS && ++tasks_exited >= tasks)
		setup_delete(sp);
	return 0;
}

/* slurmstepd, as root, at its end: cleans up if no task exit did (tasks never started). */
int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	if (spank_context() == S_CTX_REMOTE && setup_started)
		setup_delete(sp);
	return 0;
}
