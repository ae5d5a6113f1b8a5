// The seed's usage example (docs: "React Hook (lib/hooks/useRegistrationUpdates.ts)"), unchanged
// below the import; `tsc -p examples` compiles it against the package's published types.
import { useRegistrationUpdates } from '@regstream/client/react';

export function useSeedExample() {
const { isConnected, latestUpdate } = useRegistrationUpdates({
  registrationId: 42,
  onUpdate: (update) => {
    console.log('Update received:', update);
    // Update UI
  },
  onConnected: () => {
    console.log('Connected to updates');
  },
  onError: (error) => {
    console.error('Connection error:', error);
  },
  autoConnect: true,
});
return { isConnected, latestUpdate };
}
