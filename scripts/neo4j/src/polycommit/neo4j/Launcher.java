package polycommit.neo4j;

import java.io.IOException;
import java.io.PrintStream;
import java.net.InetAddress;
import java.net.UnknownHostException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.attribute.PosixFilePermissions;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import org.neo4j.cli.ExecutionContext;
import org.neo4j.commandline.admin.security.SetInitialPasswordCommand;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.graphdb.GraphDatabaseService;
import org.neo4j.graphdb.Label;
import org.neo4j.graphdb.Node;
import org.neo4j.graphdb.Transaction;
import org.neo4j.logging.log4j.Log4jLogProvider;
import org.neo4j.server.security.SecureHasher;
import org.neo4j.server.security.SystemGraphCredential;
import picocli.CommandLine;

/**
 * Runs Neo4j 5 community edition embedded, serving Bolt on one loopback address.
 *
 * <pre>
 *   POLYCOMMIT_NEO4J_PASSWORD=... java -Xmx512m [@jvm.options] -cp 'lib/*:classes' \
 *       polycommit.neo4j.Launcher --home DIR --bolt 127.0.0.1:PORT [--set key=value ...]
 * </pre>
 *
 * The password of the user {@code neo4j} comes only from the environment. Before the first start it is
 * written with the {@code neo4j-admin dbms set-initial-password} command class, so Bolt never accepts the
 * default password; on later starts the stored password is brought in line with the environment. The
 * configuration is generated into {@code DIR/conf/neo4j.conf} at every start (edits there are overwritten;
 * use {@code --set} instead). Prints {@code READY bolt://HOST:PORT} once the default database is available;
 * SIGTERM shuts the DBMS down cleanly. See scripts/neo4j/README.md.
 */
public final class Launcher {
    static final String PASSWORD_ENV = "POLYCOMMIT_NEO4J_PASSWORD";
    static final String USER = "neo4j";
    static final int EXIT_USAGE = 2;
    static final int EXIT_FAILED = 1;

    private Launcher() {}

    /** Settings that keep the embedded DBMS local, authenticated, bounded in time and modest in memory. */
    static Map<String, String> defaultSettings(String boltAddress) {
        Map<String, String> s = new LinkedHashMap<>();
        s.put("server.default_listen_address", "127.0.0.1");
        s.put("server.default_advertised_address", "127.0.0.1");
        s.put("server.bolt.enabled", "true");
        s.put("server.bolt.listen_address", boltAddress);
        s.put("server.bolt.advertised_address", boltAddress);
        s.put("server.bolt.tls_level", "DISABLED");
        s.put("server.http.enabled", "false");
        s.put("server.https.enabled", "false");
        s.put("dbms.usage_report.enabled", "false");
        s.put("dbms.security.auth_enabled", "true");
        // Memory: the caller sets the heap (-Xmx); the page cache is off-heap, so bound it explicitly.
        s.put("server.memory.pagecache.size", "128m");
        s.put("server.memory.query_cache.per_db_cache_num_entries", "200");
        s.put("dbms.memory.transaction.total.max", "256m");
        s.put("db.memory.transaction.max", "128m");
        // Time bounds: a held lock or a forgotten transaction cannot block others forever.
        s.put("db.lock.acquisition.timeout", "10s");
        s.put("db.transaction.timeout", "60s");
        // Transaction logs: small files, few kept; frequent checkpoints keep recovery after a crash short.
        s.put("db.tx_log.rotation.size", "16M");
        s.put("db.tx_log.rotation.retention_policy", "2 files");
        s.put("db.checkpoint.interval.time", "2m");
        s.put("server.bolt.thread_pool_max_size", "100");
        // Bolt's Netty loops otherwise idle 5 s each on shutdown (the databases are already stopped by then).
        s.put("internal.dbms.bolt.netty_server_shutdown_quiet_period", "0");
        return s;
    }

    public static void main(String[] args) {
        PrintStream out = System.out;
        PrintStream err = System.err;

        Path home = null;
        String bolt = null;
        Map<String, String> overrides = new LinkedHashMap<>();
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            switch (a) {
                case "--home" -> home = Path.of(requireValue(args, ++i, a)).toAbsolutePath().normalize();
                case "--bolt" -> bolt = requireValue(args, ++i, a);
                case "--set" -> {
                    String kv = requireValue(args, ++i, a);
                    int eq = kv.indexOf('=');
                    if (eq <= 0) {
                        usage("--set expects key=value, got: " + kv);
                    }
                    overrides.put(kv.substring(0, eq).trim(), kv.substring(eq + 1).trim());
                }
                case "-h", "--help" -> {
                    out.println(USAGE);
                    System.exit(0);
                }
                default -> usage("unknown argument: " + a);
            }
        }
        if (home == null || bolt == null) {
            usage("--home and --bolt are required");
        }
        String boltAddress = checkLoopback(bolt);

        String password = System.getenv(PASSWORD_ENV);
        if (password == null || password.isEmpty()) {
            err.println("polycommit-neo4j: environment variable " + PASSWORD_ENV
                    + " is not set (or empty); refusing to start a Neo4j without a password");
            System.exit(EXIT_USAGE);
        }

        Map<String, String> settings = defaultSettings(boltAddress);
        settings.putAll(overrides);
        if (!"true".equalsIgnoreCase(settings.get("dbms.security.auth_enabled"))) {
            usage("dbms.security.auth_enabled cannot be turned off");
        }

        Path conf = home.resolve("conf").resolve("neo4j.conf");
        try {
            writeConfig(conf, settings);
        } catch (IOException e) {
            err.println("polycommit-neo4j: cannot write " + conf + ": " + e);
            System.exit(EXIT_FAILED);
        }

        try {
            // The store holds the password hash and the graph: only the owner may read it.
            Files.setPosixFilePermissions(home, PosixFilePermissions.fromString("rwx------"));
        } catch (IOException | UnsupportedOperationException e) {
            err.println("polycommit-neo4j: WARNING cannot restrict permissions of " + home + ": " + e);
        }

        boolean firstStart = !Files.exists(home.resolve("data").resolve("databases")
                .resolve(GraphDatabaseSettings.SYSTEM_DATABASE_NAME));
        if (firstStart) {
            setInitialPassword(home, conf.getParent(), password);
        }

        long started = System.nanoTime();
        out.println("polycommit-neo4j: starting Neo4j (home " + home + ", bolt " + boltAddress
                + (firstStart ? ", first start" : "") + ")");
        out.flush();

        DatabaseManagementService dbms;
        try {
            dbms = new DatabaseManagementServiceBuilder(home)
                    .loadPropertiesFromFile(conf)
                    .setUserLogProvider(new Log4jLogProvider(System.out))
                    .build();
        } catch (Throwable t) {
            err.println("polycommit-neo4j: Neo4j failed to start: " + t);
            t.printStackTrace(err);
            System.exit(EXIT_FAILED);
            return;
        }

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            out.println("polycommit-neo4j: shutting down");
            out.flush();
            try {
                dbms.shutdown();
                out.println("polycommit-neo4j: stopped cleanly");
            } catch (Throwable t) {
                err.println("polycommit-neo4j: error during shutdown: " + t);
            } finally {
                out.flush();
                stopped.countDown();
            }
        }, "polycommit-neo4j-shutdown"));

        try {
            GraphDatabaseService db = dbms.database(GraphDatabaseSettings.DEFAULT_DATABASE_NAME);
            while (!db.isAvailable(TimeUnit.SECONDS.toMillis(5))) {
                out.println("polycommit-neo4j: waiting for database " + db.databaseName());
                out.flush();
            }
            if (firstStart) {
                // Only read while the system database is created; it holds a password hash, so remove it.
                Path authIni = home.resolve("data").resolve("dbms").resolve("auth.ini");
                try {
                    Files.deleteIfExists(authIni);
                } catch (IOException e) {
                    err.println("polycommit-neo4j: WARNING cannot remove " + authIni + ": " + e);
                }
            } else {
                reconcilePassword(dbms, password);
            }
        } catch (Throwable t) {
            err.println("polycommit-neo4j: Neo4j did not become available: " + t);
            t.printStackTrace(err);
            System.exit(EXIT_FAILED);
            return;
        }

        long ms = TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started);
        out.println("polycommit-neo4j: default database available after " + ms + " ms");
        out.println("READY bolt://" + boltAddress);
        out.flush();

        // Neo4j's own threads keep the JVM alive; this thread just waits for the shutdown hook.
        try {
            stopped.await();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    /** Runs {@code neo4j-admin dbms set-initial-password} in-process (the password never appears in argv). */
    private static void setInitialPassword(Path home, Path confDir, String password) {
        ExecutionContext ctx = new ExecutionContext(home, confDir);
        CommandLine cli = new CommandLine(new SetInitialPasswordCommand(ctx));
        cli.setOut(new java.io.PrintWriter(System.out, true));
        cli.setErr(new java.io.PrintWriter(System.err, true));
        int rc = cli.execute(password);
        if (rc != 0) {
            System.err.println("polycommit-neo4j: could not set the initial password (exit " + rc + "); "
                    + "Neo4j requires at least 8 characters unless dbms.security.auth_minimum_password_length "
                    + "is lowered with --set");
            System.exit(EXIT_USAGE);
        }
    }

    /** On a later start, make the stored password of {@code neo4j} match the environment. */
    private static void reconcilePassword(DatabaseManagementService dbms, String password) {
        GraphDatabaseService system = dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        long t0 = System.nanoTime();
        // Fast path: compare with the stored hash (a Cypher ALTER USER costs seconds of planning).
        try (Transaction tx = system.beginTx()) {
            Node user = tx.findNode(Label.label("User"), "name", USER);
            Object stored = user == null ? null : user.getProperty("credentials", null);
            if (stored instanceof String s
                    && SystemGraphCredential.deserialize(s, new SecureHasher())
                            .matchesPassword(password.getBytes(StandardCharsets.UTF_8))) {
                System.out.println("polycommit-neo4j: password of user '" + USER + "' matches " + PASSWORD_ENV
                        + " (checked in " + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0) + " ms)");
                System.out.flush();
                return;
            }
        } catch (Exception e) {
            // Fall through to ALTER USER, which reports "cannot be the same" when nothing changes.
        }
        try {
            system.executeTransactionally(
                    "ALTER USER " + USER + " SET PASSWORD $password CHANGE NOT REQUIRED",
                    Map.of("password", password));
            System.out.println("polycommit-neo4j: password of user '" + USER + "' updated from " + PASSWORD_ENV
                    + " (" + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0) + " ms)");
        } catch (RuntimeException e) {
            String msg = String.valueOf(e.getMessage());
            if (msg.contains("cannot be the same")) {
                System.out.println("polycommit-neo4j: password of user '" + USER + "' matches " + PASSWORD_ENV);
            } else {
                System.err.println("polycommit-neo4j: WARNING could not set the password of user '" + USER
                        + "' from " + PASSWORD_ENV + ": " + e.getClass().getSimpleName() + ": " + msg);
            }
        }
        System.out.flush();
    }

    private static void writeConfig(Path conf, Map<String, String> settings) throws IOException {
        Files.createDirectories(conf.getParent());
        StringBuilder sb = new StringBuilder();
        sb.append("# Generated by polycommit.neo4j.Launcher at every start: edits here are overwritten.\n");
        sb.append("# Pass --set key=value to the launcher instead. The password is never stored here.\n");
        settings.forEach((k, v) -> sb.append(k).append('=').append(v).append('\n'));
        Path tmp = conf.resolveSibling(conf.getFileName() + ".tmp");
        Files.writeString(tmp, sb.toString(), StandardCharsets.UTF_8);
        Files.move(tmp, conf, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
    }

    /** Accepts HOST:PORT (or [v6]:PORT) whose host is a loopback address; returns it unchanged. */
    private static String checkLoopback(String address) {
        int colon = address.lastIndexOf(':');
        if (colon <= 0 || colon == address.length() - 1) {
            usage("--bolt expects host:port, got: " + address);
        }
        String host = address.substring(0, colon);
        String port = address.substring(colon + 1);
        if (host.startsWith("[") && host.endsWith("]")) {
            host = host.substring(1, host.length() - 1);
        }
        try {
            int p = Integer.parseInt(port);
            if (p < 1 || p > 65535) {
                usage("--bolt port out of range: " + port);
            }
        } catch (NumberFormatException e) {
            usage("--bolt port is not a number: " + port);
        }
        try {
            if (!InetAddress.getByName(host).isLoopbackAddress()) {
                usage("--bolt must be a loopback address (e.g. 127.0.0.1:PORT), got: " + address);
            }
        } catch (UnknownHostException e) {
            usage("--bolt host cannot be resolved: " + host);
        }
        return address;
    }

    private static String requireValue(String[] args, int i, String flag) {
        if (i >= args.length) {
            usage(flag + " needs a value");
        }
        return args[i];
    }

    private static final String USAGE = "usage: " + PASSWORD_ENV + "=... java -cp 'lib/*:classes' "
            + "polycommit.neo4j.Launcher --home DIR --bolt 127.0.0.1:PORT [--set key=value ...]";

    private static void usage(String message) {
        System.err.println("polycommit-neo4j: " + message);
        System.err.println(USAGE);
        System.exit(EXIT_USAGE);
    }
}
