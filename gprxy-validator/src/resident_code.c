/*
 * Keeps this library's code in memory that every backend inherits (issue 19).
 *
 * PostgreSQL forks a backend for every connection. Linux does not copy a file mapping's page
 * table entries at fork (a page fault fills them in when needed), so each new backend faults in
 * every 64 KiB of this library's code and constants that its login runs, and unmaps them again
 * at exit: most of what a token login cost beyond its signature check. Called in the postmaster
 * while it loads shared_preload_libraries (one thread, before any client), this replaces each
 * whole 2 MiB block of the library's read-only mappings with an anonymous copy in one
 * transparent huge page, at the same address and with the same protection (and a segment's last
 * part too, when the rest of its 2 MiB block is the gap before the next one). Fork copies an
 * anonymous huge page's one table entry, so a backend runs that code without faulting it in,
 * and its exit has one entry to drop.
 *
 * The copy is never writable: it is mapped read-only (and executable for code) from the start
 * and filled through /proc/self/mem, as a debugger writes a breakpoint. So it counts nowhere
 * towards the commit limit (vm.overcommit_memory = 2), and nothing is ever writable and
 * executable at once. Blocks with no huge page available stay file mappings: a copy in 4 KiB
 * pages would cost every fork a table entry per page, more than the faults it saves.
 */
#define _GNU_SOURCE
#include <stddef.h>

const char *gprxy_keep_code_resident(size_t *bytes);

#ifdef __linux__
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_RANGES 16
#define HUGE_SIZE ((uintptr_t) 2 << 20)

struct range
{
	uintptr_t	start;
	uintptr_t	end;
	int			prot;
};

/* One line of /proc/self/maps: its range, permissions and path (empty for anonymous memory). */
static int
parse_line(char *line, unsigned long *start, unsigned long *end, char perms[5], char **path)
{
	int			path_at = 0;

	if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", start, end, perms, &path_at) < 3 || path_at == 0)
		return 0;
	*path = line + path_at;
	(*path)[strcspn(*path, "\n")] = '\0';
	return 1;
}

/*
 * The library's mappings that are not writable, in address order: code, constants, headers, and
 * the inaccessible gaps the loader leaves between segments (prot 0). Found
 * by the path of the mapping this function runs from (as the kernel names it: symbolic links
 * in the path PostgreSQL loaded resolved).
 */
static const char *
find_ranges(struct range *ranges, int *count)
{
	const uintptr_t self = (uintptr_t) gprxy_keep_code_resident;
	FILE	   *maps;
	char		line[4096];
	char		library[4096] = "";
	unsigned long start,
				end;
	char		perms[5];
	char	   *path;

	*count = 0;
	maps = fopen("/proc/self/maps", "r");
	if (maps == NULL)
		return "/proc/self/maps cannot be read";
	while (library[0] == '\0' && fgets(line, sizeof line, maps) != NULL)
		if (parse_line(line, &start, &end, perms, &path) && start <= self && self < end && path[0] == '/')
			snprintf(library, sizeof library, "%s", path);
	if (library[0] == '\0')
	{
		fclose(maps);
		return "the library's code was not found in /proc/self/maps";
	}
	rewind(maps);
	while (fgets(line, sizeof line, maps) != NULL)
	{
		if (!parse_line(line, &start, &end, perms, &path) || strcmp(path, library) != 0)
			continue;
		if (perms[1] == 'w')
			continue;
		if (*count == MAX_RANGES)
		{
			fclose(maps);
			return "the library has more mappings than expected";
		}
		ranges[*count].start = start;
		ranges[*count].end = end;
		ranges[*count].prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[2] == 'x' ? PROT_EXEC : 0);
		(*count)++;
	}
	fclose(maps);
	return NULL;
}

/* Whether transparent huge pages may back memory that asks for them (madvise or always). */
static int
huge_pages_offered(void)
{
	char		mode[128] = "";
	FILE	   *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");

	if (f == NULL)
		return 0;
	if (fgets(mode, sizeof mode, f) == NULL)
		mode[0] = '\0';
	fclose(f);
	return strstr(mode, "[always]") != NULL || strstr(mode, "[madvise]") != NULL;
}

/*
 * A field of the mapping that starts at `at`, in kB (/proc/self/smaps; `name` with its colon),
 * or -1 when no mapping starts there.
 */
static long
smaps_field(uintptr_t at, const char *name)
{
	char		line[4096];
	int			in_it = 0;
	long		value = -1;
	size_t		n = strlen(name);
	FILE	   *smaps = fopen("/proc/self/smaps", "r");

	if (smaps == NULL)
		return -1;
	while (fgets(line, sizeof line, smaps) != NULL)
	{
		unsigned long start,
					end;

		/* A mapping's first line starts with its range; its fields with a name and a colon. */
		if (sscanf(line, "%lx-%lx ", &start, &end) == 2)
			in_it = (start == at);
		else if (in_it && strncmp(line, name, n) == 0)
		{
			value = strtol(line + n, NULL, 10);
			break;
		}
	}
	fclose(smaps);
	return value;
}

/*
 * Replaces the 2 MiB block at `at` (2 MiB aligned) by an anonymous copy in one huge page with
 * protection `prot`, holding the block's first `len` bytes and zeros after them. mremap moves
 * the copy's page table entry into place and drops what the block mapped in one step; the bytes
 * at every readable address stay the same. Everything before mremap undoes itself on failure.
 * mremap itself unmaps the destination before it moves the copy: should the move then fail
 * (an allocation failure inside the kernel; 6.x kernels check the map count first), the block
 * would be left unmapped and the postmaster would crash at start, before any client, and
 * gprxy.resident_code = off is the way out.
 */
static const char *
copy_block(int mem, uintptr_t at, size_t len, int prot)
{
	char	   *raw = mmap(NULL, 2 * HUGE_SIZE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uintptr_t	base,
				copy;

	if (raw == MAP_FAILED)
		return "mmap of the copy failed";
	base = (uintptr_t) raw;
	copy = (base + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);
	if (copy > base)
		munmap(raw, copy - base);
	if (base + 2 * HUGE_SIZE > copy + HUGE_SIZE)
		munmap((void *) (copy + HUGE_SIZE), base + 2 * HUGE_SIZE - (copy + HUGE_SIZE));
	if (madvise((void *) copy, HUGE_SIZE, MADV_HUGEPAGE) != 0)
	{
		munmap((void *) copy, HUGE_SIZE);
		return "madvise(MADV_HUGEPAGE) of the copy failed";
	}
	if (pwrite(mem, (const void *) at, len, (off_t) copy) != (ssize_t) len)
	{
		munmap((void *) copy, HUGE_SIZE);
		return "writing the copy through /proc/self/mem failed";
	}
	if (smaps_field(copy, "AnonHugePages:") * 1024 < (long) HUGE_SIZE)
	{
		munmap((void *) copy, HUGE_SIZE);
		return "no 2 MiB page was available for the copy";
	}
	if (mremap((void *) copy, HUGE_SIZE, HUGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, (void *) at) == MAP_FAILED)
	{
		munmap((void *) copy, HUGE_SIZE);
		return "mremap onto the library failed";
	}
	return NULL;
}

/*
 * Copies every whole 2 MiB block of the library's read-only mappings, and each one's last part
 * when a gap fills the rest of its block. Returns NULL when all were copied, else what stopped
 * it; *bytes is what was copied either way (the rest stays file mappings: the code at every
 * address is the same).
 */
const char *
gprxy_keep_code_resident(size_t *bytes)
{
	struct range ranges[MAX_RANGES];
	int			count;
	int			mem;
	const char *failed;

	*bytes = 0;
	if (!huge_pages_offered())
		return "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled)";
	failed = find_ranges(ranges, &count);
	if (failed)
		return failed;
	mem = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
	if (mem < 0)
		return "/proc/self/mem cannot be opened for writing";
	for (int i = 0; i < count && !failed; i++)
	{
		const struct range *r = &ranges[i];
		uintptr_t	at = (r->start + HUGE_SIZE - 1) & ~(HUGE_SIZE - 1);

		/*
		 * Gaps hold nothing to copy; a mapping with private copies of its pages (the relocated
		 * RELRO data) is inherited at fork already.
		 */
		if (!(r->prot & PROT_READ) || smaps_field(r->start, "Anonymous:") != 0)
			continue;
		for (; at + HUGE_SIZE <= r->end && !failed; at += HUGE_SIZE)
		{
			failed = copy_block(mem, at, HUGE_SIZE, r->prot);
			if (!failed)
				*bytes += HUGE_SIZE;
		}
		/*
		 * The segment's end, when the rest of its block is the loader's inaccessible gap before
		 * the next segment: one huge page holds both, the gap's part zeros with the segment's
		 * protection (nothing the file held there becomes readable).
		 */
		if (!failed && at < r->end && i + 1 < count && ranges[i + 1].prot == 0 &&
			ranges[i + 1].start == r->end && ranges[i + 1].end >= at + HUGE_SIZE)
		{
			failed = copy_block(mem, at, r->end - at, r->prot);
			if (!failed)
				*bytes += r->end - at;
		}
	}
	close(mem);
	return failed;
}

#else

const char *
gprxy_keep_code_resident(size_t *bytes)
{
	*bytes = 0;
	return "not supported on this operating system";
}

#endif
