// Runs a Java tool's main with its arguments read from stdin, one per line, so that secrets among them
// (kafka-storage format --add-scram) never appear in a command line other local users can read in /proc.
// Used by polycommit/tooling/servers/kafka_security.py as a single-file source program:
//   java -cp '<kafka libs>/*' StdinArgs.java kafka.tools.StorageTool < args
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

public class StdinArgs {
    public static void main(String[] argv) throws Exception {
        List<String> args = new ArrayList<>();
        try (BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            for (String line = in.readLine(); line != null; line = in.readLine()) {
                args.add(line);
            }
        }
        Class.forName(argv[0]).getMethod("main", String[].class).invoke(null, (Object) args.toArray(new String[0]));
    }
}
